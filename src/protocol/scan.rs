//! Framing without copying: walks a byte buffer message by message, hands out the tag,
//! the length and (for the tags the caller inspects) the whole body, and lets the bytes
//! of uninspected messages stream through even when a message spans many reads.

use std::fmt;

/// A message found in the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    pub tag: u8,
    /// The length field: the message size without the tag byte.
    pub len: u32,
    /// The body (bytes after the 5-byte header), when the caller asked to inspect this
    /// tag. `None` for streamed messages.
    pub body: Option<&'a [u8]>,
}

/// Malformed framing: the peer is not speaking the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanError {
    /// The length field is below 4.
    BadLength { tag: u8, len: u32 },
    /// The message is larger than the configured limit.
    TooLarge { tag: u8, len: u32, max: u32 },
}

impl fmt::Display for ScanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScanError::BadLength { tag, len } => {
                write!(f, "invalid message length {len} for message type '{}'", *tag as char)
            }
            ScanError::TooLarge { tag, len, max } => write!(
                f,
                "message type '{}' of {len} bytes exceeds the limit of {max} bytes (max_message_size)",
                *tag as char
            ),
        }
    }
}

impl std::error::Error for ScanError {}

/// Per-direction framing state: how much of a streamed message is still to come.
#[derive(Debug, Clone)]
pub struct Scanner {
    skip: usize,
    max_len: u32,
}

impl Scanner {
    pub fn new(max_len: u32) -> Self {
        Scanner { skip: 0, max_len }
    }

    /// True when a streamed message is still incomplete.
    pub fn mid_message(&self) -> bool {
        self.skip > 0
    }

    /// Starts a pass over a fresh buffer: skips the rest of a message that began in an
    /// earlier buffer and returns the position of the first unscanned byte.
    pub fn resume(&mut self, buf: &[u8]) -> usize {
        let n = self.skip.min(buf.len());
        self.skip -= n;
        n
    }

    /// The next message at `*pos`, advancing `*pos` past what may be forwarded.
    ///
    /// `whole(tag)` says whether the caller needs the full body of a message with that
    /// tag; such a message is returned only once it is complete (otherwise `None`, with
    /// `*pos` left at its start so that the caller keeps those bytes). Other messages are
    /// returned as soon as their header is complete, and the scanner skips their body,
    /// across later buffers if need be.
    pub fn next<'a>(
        &mut self,
        buf: &'a [u8],
        pos: &mut usize,
        whole: impl Fn(u8) -> bool,
    ) -> Result<Option<Frame<'a>>, ScanError> {
        if self.skip > 0 {
            return Ok(None);
        }
        let rest = &buf[*pos..];
        if rest.len() < 5 {
            return Ok(None);
        }
        let tag = rest[0];
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]);
        if len < 4 {
            return Err(ScanError::BadLength { tag, len });
        }
        if len > self.max_len {
            return Err(ScanError::TooLarge {
                tag,
                len,
                max: self.max_len,
            });
        }
        let total = 1 + len as usize;
        if whole(tag) {
            if rest.len() < total {
                return Ok(None);
            }
            *pos += total;
            return Ok(Some(Frame {
                tag,
                len,
                body: Some(&rest[5..total]),
            }));
        }
        if rest.len() >= total {
            *pos += total;
        } else {
            self.skip = total - rest.len();
            *pos = buf.len();
        }
        Ok(Some(Frame {
            tag,
            len,
            body: None,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn streams_uninspected_and_waits_for_inspected() {
        let mut buf = msg(b'D', &[7u8; 100]);
        buf.extend(msg(b'Z', b"I"));
        let mut s = Scanner::new(1 << 20);
        // Only the first 50 bytes arrived.
        let part = &buf[..50];
        let mut pos = s.resume(part);
        let f = s.next(part, &mut pos, |t| t == b'Z').unwrap().unwrap();
        assert_eq!((f.tag, f.body), (b'D', None));
        assert_eq!(pos, 50);
        assert!(s.mid_message());
        assert_eq!(s.next(part, &mut pos, |t| t == b'Z').unwrap(), None);
        // The rest arrives, with the ReadyForQuery cut in two.
        let rest = &buf[50..buf.len() - 2];
        let mut pos = s.resume(rest);
        assert_eq!(pos, 105 - 50);
        assert_eq!(s.next(rest, &mut pos, |t| t == b'Z').unwrap(), None);
        assert_eq!(pos, 105 - 50, "an incomplete inspected message is kept");
        let tail = &buf[105..];
        let mut pos = s.resume(tail);
        let f = s.next(tail, &mut pos, |t| t == b'Z').unwrap().unwrap();
        assert_eq!(f.body, Some(&b"I"[..]));
        assert_eq!(pos, tail.len());
    }

    #[test]
    fn rejects_bad_lengths() {
        let mut s = Scanner::new(1000);
        let buf = [b'Q', 0, 0, 0, 3];
        assert!(matches!(
            s.next(&buf, &mut 0, |_| true),
            Err(ScanError::BadLength { .. })
        ));
        let buf = [b'Q', 0, 1, 0, 0];
        assert!(matches!(
            s.next(&buf, &mut 0, |_| true),
            Err(ScanError::TooLarge { .. })
        ));
    }
}
