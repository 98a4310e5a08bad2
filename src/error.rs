//! The one error type for what reaches a client: an ErrorResponse-to-be with its
//! SQLSTATE, message and hint, who failed (the client, the server, pgtide), and whether
//! a retry elsewhere is safe (nothing of the work reached a server, or nothing of its
//! answer reached the client). Decisions read these fields, never the message text.

use std::borrow::Cow;
use std::fmt;

/// Who an error is the fault of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Who {
    /// The client broke the protocol or asked for something refused.
    Client,
    /// The server failed or went away.
    Server,
    /// pgtide itself: a limit, a timeout, shutdown.
    Pooler,
}

/// An error a client is to be told.
#[derive(Clone, Debug)]
pub struct Error {
    /// The SQLSTATE.
    pub code: Cow<'static, str>,
    pub message: String,
    pub hint: Option<String>,
    pub who: Who,
    /// The work may run again elsewhere without the client seeing anything twice.
    pub retry_safe: bool,
}

impl Error {
    fn new(who: Who, code: impl Into<Cow<'static, str>>, message: impl Into<String>) -> Error {
        Error {
            code: code.into(),
            message: message.into(),
            hint: None,
            who,
            retry_safe: false,
        }
    }

    /// The client's fault (a protocol violation, a refused request).
    pub fn client(code: impl Into<Cow<'static, str>>, message: impl Into<String>) -> Error {
        Error::new(Who::Client, code, message)
    }

    /// The server's failure.
    pub fn server(code: impl Into<Cow<'static, str>>, message: impl Into<String>) -> Error {
        Error::new(Who::Server, code, message)
    }

    /// pgtide's own refusal (a limit, a timeout, shutdown).
    pub fn pooler(code: impl Into<Cow<'static, str>>, message: impl Into<String>) -> Error {
        Error::new(Who::Pooler, code, message)
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Error {
        self.hint = Some(hint.into());
        self
    }

    /// Marks the work as safe to run again elsewhere (nothing reached a server).
    pub fn retry_safe(mut self) -> Error {
        self.retry_safe = true;
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (SQLSTATE {})", self.message, self.code)
    }
}

impl std::error::Error for Error {}
