//! PostgreSQL's md5 password scheme: the stored hash `md5` + hex(md5(password + user)) and
//! the salted response `md5` + hex(md5(hex_hash + salt)) sent in a PasswordMessage.

use ::md5::{Digest, Md5};

/// The prefix of PostgreSQL md5 hashes and md5 responses.
pub const PREFIX: &str = "md5";

/// Lowercase hex md5 of the concatenation of `parts`.
pub fn md5_hex(parts: &[&[u8]]) -> String {
    let mut h = Md5::new();
    for p in parts {
        h.update(p);
    }
    let digest = h.finalize();
    let mut out = String::with_capacity(32);
    for b in digest {
        out.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
        out.push(char::from(b"0123456789abcdef"[usize::from(b & 0xf)]));
    }
    out
}

/// The 32 hex digits PostgreSQL stores (after `md5`) for `password` of `user`.
pub fn password_hash(password: &str, user: &str) -> String {
    md5_hex(&[password.as_bytes(), user.as_bytes()])
}

/// The PasswordMessage content for an md5 challenge: `md5` + hex(md5(hash_hex + salt)),
/// where `hash_hex` is the stored hash without its `md5` prefix.
pub fn salted_response(hash_hex: &str, salt: [u8; 4]) -> String {
    format!("{PREFIX}{}", md5_hex(&[hash_hex.as_bytes(), &salt]))
}

/// True for `md5` followed by exactly 32 lowercase hex digits (PostgreSQL's test).
pub fn is_md5_hash(s: &str) -> bool {
    s.len() == 35
        && s.starts_with(PREFIX)
        && s.as_bytes()[3..]
            .iter()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_md5_hash() {
        // md5 of password + user, for user "postgres" with password "secret" (Python hashlib).
        let h = password_hash("secret", "postgres");
        assert_eq!(
            format!("{PREFIX}{h}"),
            "md553f48b7c4b76a86ce72276c5755f217d"
        );
        assert_eq!(
            format!("{PREFIX}{h}"),
            postgres_protocol::password::md5(b"secret", "postgres")
        );
        assert!(is_md5_hash("md553f48b7c4b76a86ce72276c5755f217d"));
    }

    #[test]
    fn salted_response_matches_independent_value() {
        let h = password_hash("secret", "postgres");
        assert_eq!(
            salted_response(&h, [1, 2, 3, 4]),
            "md5bb41a296aab6baccb36ff243a562abff"
        );
        assert_ne!(
            salted_response(&h, [1, 2, 3, 5]),
            "md5bb41a296aab6baccb36ff243a562abff"
        );
    }

    #[test]
    fn md5_hash_detection() {
        assert!(!is_md5_hash("md553F48B7C4B76A86CE72276C5755F217D"));
        assert!(!is_md5_hash("md553f48b7c4b76a86ce72276c5755f217"));
        assert!(!is_md5_hash("md553f48b7c4b76a86ce72276c5755f217dd"));
        assert!(!is_md5_hash("xyz53f48b7c4b76a86ce72276c5755f217d"));
        assert!(!is_md5_hash("md5"));
        assert!(!is_md5_hash("md5ééééééééééééééé"));
    }
}
