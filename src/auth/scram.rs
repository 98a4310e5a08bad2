//! SCRAM-SHA-256 (RFC 5802 / RFC 7677) as PostgreSQL speaks it, sans IO: key derivation,
//! the `SCRAM-SHA-256$iter:salt$StoredKey:ServerKey` verifier, and the two state machines
//! ([`ScramServer`] for clients logging in to pgtide, [`ScramClient`] for pgtide logging in
//! to PostgreSQL). Nonces and salts are injectable so that the RFC test vectors can be
//! replayed. Channel binding (SCRAM-SHA-256-PLUS) is not offered, with or without TLS:
//! a client that asks for it is refused, one that could use it (`y` flag) goes on
//! without.

use std::borrow::Cow;
use std::fmt;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};

/// The only SASL mechanism pgtide offers and uses.
pub const MECHANISM: &str = "SCRAM-SHA-256";
/// Iterations for verifiers pgtide derives itself (PostgreSQL's default).
pub const DEFAULT_ITERATIONS: u32 = 4096;
/// Salt length for verifiers pgtide derives itself (PostgreSQL's default).
pub const SALT_LEN: usize = 16;
/// Random bytes in a nonce (before base64), as libpq and PostgreSQL use.
pub const NONCE_LEN: usize = 18;

const VERIFIER_PREFIX: &str = "SCRAM-SHA-256$";

/// Why a SCRAM step did not succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScramError {
    /// The peer sent something that is not a valid SCRAM message in this state.
    Protocol(String),
    /// The exchange was well formed but the proof (or server signature) is wrong.
    Failed,
}

fn malformed(what: &str) -> ScramError {
    ScramError::Protocol(format!("malformed SCRAM message ({what})"))
}

pub fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length; this cannot fail.
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(data);
    m.finalize().into_bytes().into()
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// Equality that takes the same time wherever the inputs differ (lengths are not secret).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The password as PostgreSQL hashes it: SASLprep-normalized, or the raw bytes when
/// SASLprep rejects it (what both the server and libpq do).
pub fn normalize_password(password: &str) -> Cow<'_, [u8]> {
    match stringprep::saslprep(password) {
        Ok(Cow::Borrowed(s)) => Cow::Borrowed(s.as_bytes()),
        Ok(Cow::Owned(s)) => Cow::Owned(s.into_bytes()),
        Err(_) => Cow::Borrowed(password.as_bytes()),
    }
}

/// SaltedPassword = Hi(Normalize(password), salt, i). This is the expensive step.
pub fn salted_password(password: &str, salt: &[u8], iterations: u32) -> [u8; 32] {
    let mut out = [0u8; 32];
    pbkdf2::pbkdf2_hmac::<Sha256>(&normalize_password(password), salt, iterations, &mut out);
    out
}

/// A fresh random nonce: [`NONCE_LEN`] random bytes, base64 (printable, no comma).
pub fn random_nonce() -> String {
    let mut raw = [0u8; NONCE_LEN];
    rand::thread_rng().fill_bytes(&mut raw);
    B64.encode(raw)
}

/// What PostgreSQL stores for a SCRAM password: enough to verify a client, not to log in.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramVerifier {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl ScramVerifier {
    pub fn from_salted_password(salted: &[u8; 32], salt: &[u8], iterations: u32) -> Self {
        let client_key = hmac(salted, b"Client Key");
        ScramVerifier {
            iterations,
            salt: salt.to_vec(),
            stored_key: sha256(&client_key),
            server_key: hmac(salted, b"Server Key"),
        }
    }

    /// The verifier of `password` with a given salt (runs PBKDF2).
    pub fn derive(password: &str, salt: &[u8], iterations: u32) -> Self {
        Self::from_salted_password(
            &salted_password(password, salt, iterations),
            salt,
            iterations,
        )
    }

    /// The verifier of `password` with a random salt and the default iteration count.
    pub fn generate(password: &str) -> Self {
        let mut salt = [0u8; SALT_LEN];
        rand::thread_rng().fill_bytes(&mut salt);
        Self::derive(password, &salt, DEFAULT_ITERATIONS)
    }

    /// Parses `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>` (base64 parts);
    /// `None` when the string is not exactly that.
    pub fn parse(s: &str) -> Option<Self> {
        let rest = s.strip_prefix(VERIFIER_PREFIX)?;
        let (iter_salt, keys) = rest.split_once('$')?;
        let (iter, salt) = iter_salt.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        if !iter.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let iterations: u32 = iter.parse().ok().filter(|&i| i > 0)?;
        let salt = B64.decode(salt).ok().filter(|s| !s.is_empty())?;
        let stored_key = B64.decode(stored).ok()?.try_into().ok()?;
        let server_key = B64.decode(server).ok()?.try_into().ok()?;
        Some(ScramVerifier {
            iterations,
            salt,
            stored_key,
            server_key,
        })
    }
}

impl fmt::Display for ScramVerifier {
    /// The verifier in PostgreSQL's `pg_authid.rolpassword` format.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{VERIFIER_PREFIX}{}:{}${}:{}",
            self.iterations,
            B64.encode(&self.salt),
            B64.encode(self.stored_key),
            B64.encode(self.server_key)
        )
    }
}

impl fmt::Debug for ScramVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramVerifier")
            .field("iterations", &self.iterations)
            .finish_non_exhaustive()
    }
}

/// A nonce is printable ASCII except ',' (RFC 5802), and not empty.
fn valid_nonce(n: &str) -> bool {
    !n.is_empty() && n.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b',')
}

/// Splits `k=value` off the front of `s` (up to the next ',').
fn attr(s: &str, key: char) -> Option<(&str, &str)> {
    let (item, rest) = s.split_once(',').unwrap_or((s, ""));
    let value = item.strip_prefix(key)?.strip_prefix('=')?;
    Some((value, rest))
}

enum ServerState {
    Initial,
    SentFirst {
        gs2_header: &'static str,
        client_first_bare: String,
        server_first: String,
        nonce: String,
    },
    Done,
}

/// Server side of one SCRAM-SHA-256 exchange (pgtide verifying a client).
pub struct ScramServer {
    verifier: ScramVerifier,
    /// A mock exchange (unknown user, no SCRAM secret): looks real, always fails.
    doomed: bool,
    server_nonce: String,
    state: ServerState,
    /// The ClientKey recovered from a valid proof (for SCRAM pass-through to servers).
    client_key: Option<[u8; 32]>,
}

impl ScramServer {
    /// An exchange against `verifier`, with the server's part of the nonce given.
    pub fn new(verifier: ScramVerifier, server_nonce: String) -> Self {
        ScramServer {
            verifier,
            doomed: false,
            server_nonce,
            state: ServerState::Initial,
            client_key: None,
        }
    }

    /// The verifier this exchange checks against.
    pub fn verifier(&self) -> &ScramVerifier {
        &self.verifier
    }

    /// After a successful [`Self::client_final`]: the client's ClientKey, recovered as
    /// ClientProof XOR HMAC(StoredKey, AuthMessage). With the verifier's ServerKey it is
    /// enough to log in to a server that stores the same verifier.
    pub fn client_key(&self) -> Option<[u8; 32]> {
        self.client_key
    }

    /// An exchange that runs like a real one and then fails with [`ScramError::Failed`].
    pub fn mock(verifier: ScramVerifier, server_nonce: String) -> Self {
        ScramServer {
            doomed: true,
            ..Self::new(verifier, server_nonce)
        }
    }

    /// Takes the client-first-message, returns the server-first-message.
    pub fn client_first(&mut self, data: &[u8]) -> Result<String, ScramError> {
        if !matches!(self.state, ServerState::Initial) {
            return Err(ScramError::Protocol(
                "unexpected SCRAM client-first-message".into(),
            ));
        }
        let msg = std::str::from_utf8(data).map_err(|_| malformed("not valid UTF-8"))?;
        let (gs2_header, rest) = match msg.as_bytes().first() {
            Some(b'n') => ("n,,", &msg[1..]),
            Some(b'y') => ("y,,", &msg[1..]),
            Some(b'p') => return Err(ScramError::Protocol(
                "client requested SCRAM channel binding (SCRAM-SHA-256-PLUS), which pgtide does \
                     not offer; connect with channel_binding=prefer or disable"
                    .into(),
            )),
            _ => {
                return Err(malformed(
                    "unexpected channel-binding flag in client-first-message",
                ))
            }
        };
        let rest = rest
            .strip_prefix(',')
            .ok_or_else(|| malformed("comma expected after channel-binding flag"))?;
        if rest.starts_with("a=") {
            return Err(ScramError::Protocol(
                "client uses a SCRAM authorization identity, which is not supported".into(),
            ));
        }
        let bare = rest
            .strip_prefix(',')
            .ok_or_else(|| malformed("unexpected gs2 header"))?;
        if bare.starts_with("m=") {
            return Err(ScramError::Protocol(
                "client requires an unsupported SCRAM extension".into(),
            ));
        }
        // The user name is ignored, as PostgreSQL does: the startup message names the user.
        let (_user, after) =
            attr(bare, 'n').ok_or_else(|| malformed("user name attribute expected"))?;
        let (cnonce, _extensions) =
            attr(after, 'r').ok_or_else(|| malformed("nonce attribute expected"))?;
        if !valid_nonce(cnonce) {
            return Err(malformed("invalid client nonce"));
        }
        let nonce = format!("{cnonce}{}", self.server_nonce);
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&self.verifier.salt),
            self.verifier.iterations
        );
        self.state = ServerState::SentFirst {
            gs2_header,
            client_first_bare: bare.to_owned(),
            server_first: server_first.clone(),
            nonce,
        };
        Ok(server_first)
    }

    /// Takes the client-final-message, checks the proof, returns the server-final-message.
    pub fn client_final(&mut self, data: &[u8]) -> Result<String, ScramError> {
        let ServerState::SentFirst {
            gs2_header,
            client_first_bare,
            server_first,
            nonce,
        } = std::mem::replace(&mut self.state, ServerState::Done)
        else {
            return Err(ScramError::Protocol(
                "unexpected SCRAM client-final-message".into(),
            ));
        };
        let msg = std::str::from_utf8(data).map_err(|_| malformed("not valid UTF-8"))?;
        let (cbind, rest) =
            attr(msg, 'c').ok_or_else(|| malformed("channel-binding attribute expected"))?;
        let cbind = B64
            .decode(cbind)
            .map_err(|_| malformed("invalid channel-binding data"))?;
        if cbind != gs2_header.as_bytes() {
            return Err(ScramError::Protocol(
                "SCRAM channel binding check failed: the client-final-message does not repeat the gs2 header"
                    .into(),
            ));
        }
        let (client_nonce, _) =
            attr(rest, 'r').ok_or_else(|| malformed("nonce attribute expected"))?;
        if client_nonce != nonce {
            return Err(ScramError::Protocol("SCRAM nonce mismatch".into()));
        }
        // The proof is the last attribute; everything before it is signed.
        let (without_proof, proof) = msg
            .rsplit_once(",p=")
            .ok_or_else(|| malformed("proof attribute expected"))?;
        if proof.contains(',') {
            return Err(malformed("garbage at end of client-final-message"));
        }
        let proof: [u8; 32] = B64
            .decode(proof)
            .ok()
            .and_then(|p| p.try_into().ok())
            .ok_or_else(|| malformed("invalid ClientProof"))?;
        let auth_message = format!("{client_first_bare},{server_first},{without_proof}");
        let signature = hmac(&self.verifier.stored_key, auth_message.as_bytes());
        let mut client_key = [0u8; 32];
        for (k, (p, s)) in client_key.iter_mut().zip(proof.iter().zip(&signature)) {
            *k = p ^ s;
        }
        let ok = ct_eq(&sha256(&client_key), &self.verifier.stored_key);
        if !ok || self.doomed {
            return Err(ScramError::Failed);
        }
        self.client_key = Some(client_key);
        let server_signature = hmac(&self.verifier.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_signature)))
    }
}

/// Salt and iteration count from a server-first-message: the input of PBKDF2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFirst {
    pub salt: Vec<u8>,
    pub iterations: u32,
}

enum ClientStep {
    Initial,
    GotFirst { server_first: String, nonce: String },
    SentFinal { server_signature: [u8; 32] },
    Done,
}

/// Client side of one SCRAM-SHA-256 exchange (pgtide logging in to PostgreSQL), without
/// channel binding. The caller computes the SaltedPassword between [`Self::server_first`]
/// and [`Self::client_final`], so that it can cache it.
pub struct ScramClient {
    client_nonce: String,
    client_first_bare: String,
    state: ClientStep,
}

impl ScramClient {
    /// `user` goes into the message as a saslname; PostgreSQL ignores it (libpq sends "").
    pub fn new(user: &str, client_nonce: String) -> Self {
        let user = user.replace('=', "=3D").replace(',', "=2C");
        let client_first_bare = format!("n={user},r={client_nonce}");
        ScramClient {
            client_nonce,
            client_first_bare,
            state: ClientStep::Initial,
        }
    }

    /// The client-first-message (gs2 header "n,,": no channel binding).
    pub fn client_first(&self) -> String {
        format!("n,,{}", self.client_first_bare)
    }

    /// Takes the server-first-message; returns the salt and iteration count.
    pub fn server_first(&mut self, data: &[u8]) -> Result<ServerFirst, ScramError> {
        if !matches!(self.state, ClientStep::Initial) {
            return Err(ScramError::Protocol(
                "unexpected SCRAM server-first-message".into(),
            ));
        }
        let msg = std::str::from_utf8(data).map_err(|_| malformed("not valid UTF-8"))?;
        if msg.starts_with("m=") {
            return Err(ScramError::Protocol(
                "server requires an unsupported SCRAM extension".into(),
            ));
        }
        let (nonce, rest) = attr(msg, 'r').ok_or_else(|| malformed("nonce attribute expected"))?;
        let (salt, rest) = attr(rest, 's').ok_or_else(|| malformed("salt attribute expected"))?;
        let (iterations, _extensions) =
            attr(rest, 'i').ok_or_else(|| malformed("iteration count expected"))?;
        if !valid_nonce(nonce)
            || !nonce.starts_with(&self.client_nonce)
            || nonce.len() == self.client_nonce.len()
        {
            return Err(ScramError::Protocol(
                "SCRAM nonce mismatch in server-first-message".into(),
            ));
        }
        let salt = B64
            .decode(salt)
            .ok()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| malformed("invalid salt"))?;
        let iterations: u32 = Some(iterations)
            .filter(|i| i.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|i| i.parse().ok())
            .filter(|&i| i > 0)
            .ok_or_else(|| malformed("invalid iteration count"))?;
        self.state = ClientStep::GotFirst {
            server_first: msg.to_owned(),
            nonce: nonce.to_owned(),
        };
        Ok(ServerFirst { salt, iterations })
    }

    /// The client-final-message, given SaltedPassword for the salt from the server.
    pub fn client_final(&mut self, salted: &[u8; 32]) -> Result<String, ScramError> {
        let client_key = hmac(salted, b"Client Key");
        let server_key = hmac(salted, b"Server Key");
        self.client_final_with_keys(&client_key, &server_key)
    }

    /// The client-final-message from ClientKey and ServerKey directly: SCRAM pass-through,
    /// where pgtide has a client's ClientKey and the verifier, but not the password. Only
    /// valid when the server's salt and iterations are those of that verifier.
    pub fn client_final_with_keys(
        &mut self,
        client_key: &[u8; 32],
        server_key: &[u8; 32],
    ) -> Result<String, ScramError> {
        let ClientStep::GotFirst {
            server_first,
            nonce,
        } = std::mem::replace(&mut self.state, ClientStep::Done)
        else {
            return Err(ScramError::Protocol(
                "SCRAM client-final-message out of order".into(),
            ));
        };
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{server_first},{without_proof}", self.client_first_bare);
        let signature = hmac(&sha256(client_key), auth_message.as_bytes());
        let mut proof = [0u8; 32];
        for (p, (k, s)) in proof.iter_mut().zip(client_key.iter().zip(&signature)) {
            *p = k ^ s;
        }
        self.state = ClientStep::SentFinal {
            server_signature: hmac(server_key, auth_message.as_bytes()),
        };
        Ok(format!("{without_proof},p={}", B64.encode(proof)))
    }

    /// Takes the server-final-message and checks the server's signature.
    pub fn server_final(&mut self, data: &[u8]) -> Result<(), ScramError> {
        let ClientStep::SentFinal { server_signature } =
            std::mem::replace(&mut self.state, ClientStep::Done)
        else {
            return Err(ScramError::Protocol(
                "unexpected SCRAM server-final-message".into(),
            ));
        };
        let msg = std::str::from_utf8(data).map_err(|_| malformed("not valid UTF-8"))?;
        if let Some((err, _)) = attr(msg, 'e') {
            return Err(ScramError::Protocol(format!(
                "server reported SCRAM error: {err}"
            )));
        }
        let (v, _extensions) =
            attr(msg, 'v').ok_or_else(|| malformed("server signature expected"))?;
        let v = B64
            .decode(v)
            .map_err(|_| malformed("invalid server signature"))?;
        if ct_eq(&v, &server_signature) {
            Ok(())
        } else {
            Err(ScramError::Protocol(
                "the server's SCRAM signature is wrong: it does not know this password".into(),
            ))
        }
    }
}

#[cfg(test)]
#[path = "scram_tests.rs"]
mod tests;
