//! `auth_hba_file`: host-based authentication rules in PostgreSQL's `pg_hba.conf` format.
//! The first line that matches a connection (its type, database, user and address)
//! decides the method; no matching line means the connection is refused.
//!
//! Supported, one record per line (a trailing `\` continues a line, `#` starts a comment):
//!
//! ```text
//! local      DATABASE USER                METHOD
//! host       DATABASE USER ADDRESS        METHOD
//! hostssl    DATABASE USER ADDRESS        METHOD
//! hostnossl  DATABASE USER IP-ADDRESS IP-MASK METHOD
//! ```
//!
//! - DATABASE: `all`, `sameuser`, `replication` (never matches: pgtide refuses
//!   replication connections) or names, comma-separated; a quoted name is never a keyword.
//! - USER: `all` or names, comma-separated.
//! - ADDRESS: `all`, an IPv4 or IPv6 CIDR (`10.0.0.0/8`, `::1/128`), or an address
//!   followed by a mask. An IPv4 client connected through an IPv6 socket
//!   (`::ffff:10.1.2.3`) matches IPv4 entries.
//! - METHOD: `trust`, `reject`, `md5`, `scram-sha-256`, `password`, `cert`.
//!
//! Refused with a precise error when the file is loaded (rather than silently never
//! matching): `+group` and `@file` names, `samerole`/`samegroup`, host names and
//! `samehost`/`samenet`, other methods (`peer`, `ldap`, ...) and options after the method
//! (`clientcert=...`, `map=...`). `local` lines are accepted but never match: pgtide
//! listens on TCP only.

use std::net::IpAddr;

use super::Peer;

/// What the matching line says to do with a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HbaMethod {
    Trust,
    Reject,
    Md5,
    ScramSha256,
    /// The password in clear text.
    Password,
    /// A TLS client certificate whose common name is the user name; no password.
    Cert,
}

impl HbaMethod {
    fn parse(s: &str) -> Result<HbaMethod, String> {
        Ok(match s {
            "trust" => HbaMethod::Trust,
            "reject" => HbaMethod::Reject,
            "md5" => HbaMethod::Md5,
            "scram-sha-256" => HbaMethod::ScramSha256,
            "password" => HbaMethod::Password,
            "cert" => HbaMethod::Cert,
            other => {
                return Err(format!(
                    "authentication method {other:?} is not supported by pgtide; use trust, reject, md5, scram-sha-256, password or cert"
                ))
            }
        })
    }
}

impl std::fmt::Display for HbaMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HbaMethod::Trust => "trust",
            HbaMethod::Reject => "reject",
            HbaMethod::Md5 => "md5",
            HbaMethod::ScramSha256 => "scram-sha-256",
            HbaMethod::Password => "password",
            HbaMethod::Cert => "cert",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ConnType {
    Local,
    Host,
    HostSsl,
    HostNoSsl,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Name {
    All,
    SameUser,
    Replication,
    Exact(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Address {
    All,
    /// Network address (already masked) and prefix length.
    Net(IpAddr, u8),
}

/// One line of the file.
#[derive(Clone, Debug)]
pub struct HbaRule {
    /// Line number in the file (of the line's first physical line).
    pub line: usize,
    conn: ConnType,
    databases: Vec<Name>,
    users: Vec<Name>,
    address: Address,
    pub method: HbaMethod,
}

/// The rules of an `auth_hba_file`, in file order.
#[derive(Clone, Debug, Default)]
pub struct HbaRules {
    rules: Vec<HbaRule>,
}

/// One whitespace-separated token: its text, whether any of it was quoted, and whether
/// an unquoted comma ended it (the field's list continues with the next token).
struct Token {
    text: String,
    quoted: bool,
    comma: bool,
}

/// Splits a logical line into fields, each a list of tokens (`a,b` and `a, b` are one
/// field of two tokens). Stops at an unquoted `#`.
fn fields(line: &str) -> Result<Vec<Vec<Token>>, String> {
    let mut out: Vec<Vec<Token>> = Vec::new();
    let mut chars = line.chars().peekable();
    let mut continues = false;
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        match chars.peek() {
            None | Some('#') => break,
            _ => {}
        }
        let mut tok = Token {
            text: String::new(),
            quoted: false,
            comma: false,
        };
        let mut in_quote = false;
        while let Some(&c) = chars.peek() {
            if in_quote {
                chars.next();
                if c == '"' {
                    if chars.peek() == Some(&'"') {
                        chars.next();
                        tok.text.push('"');
                    } else {
                        in_quote = false;
                    }
                } else {
                    tok.text.push(c);
                }
                continue;
            }
            if c.is_whitespace() || c == '#' {
                break;
            }
            chars.next();
            match c {
                '"' => {
                    in_quote = true;
                    tok.quoted = true;
                }
                ',' => {
                    tok.comma = true;
                    break;
                }
                _ => tok.text.push(c),
            }
        }
        if in_quote {
            return Err("a double-quoted name is not closed".into());
        }
        let comma = tok.comma;
        if continues {
            if let Some(last) = out.last_mut() {
                last.push(tok);
            }
        } else {
            out.push(vec![tok]);
        }
        continues = comma;
    }
    if continues {
        return Err("the line ends with a comma; a list needs a name after each comma".into());
    }
    Ok(out)
}

fn names(field: &[Token], what: &str) -> Result<Vec<Name>, String> {
    let mut out = Vec::new();
    for t in field {
        if t.text.is_empty() {
            return Err(format!("an empty {what} name in a list"));
        }
        if t.quoted {
            out.push(Name::Exact(t.text.clone()));
            continue;
        }
        let name = match (what, t.text.as_str()) {
            (_, "all") => Name::All,
            ("database", "sameuser") => Name::SameUser,
            ("database", "replication") => Name::Replication,
            ("database", k @ ("samerole" | "samegroup")) => {
                return Err(format!(
                    "database keyword {k:?} (role membership) is not supported by pgtide; list the databases"
                ))
            }
            (_, s) if s.starts_with('@') => {
                return Err(format!(
                    "{what} file inclusion {s:?} is not supported by pgtide; list the names on the line"
                ))
            }
            ("user", s) if s.starts_with('+') => {
                return Err(format!(
                    "group membership {s:?} is not supported by pgtide (it cannot see role memberships); list the users"
                ))
            }
            ("user", s) if s.starts_with('/') => {
                return Err(format!(
                    "regular expression {s:?} is not supported by pgtide; list the users"
                ))
            }
            ("database", s) if s.starts_with('/') => {
                return Err(format!(
                    "regular expression {s:?} is not supported by pgtide; list the databases"
                ))
            }
            (_, s) => Name::Exact(s.to_string()),
        };
        out.push(name);
    }
    Ok(out)
}

/// Applies a prefix length to an address.
fn masked(ip: IpAddr, bits: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let m = if bits == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(bits))
            };
            IpAddr::V4((u32::from(v4) & m).into())
        }
        IpAddr::V6(v6) => {
            let m = if bits == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(bits))
            };
            IpAddr::V6((u128::from(v6) & m).into())
        }
    }
}

fn max_bits(ip: IpAddr) -> u8 {
    if ip.is_ipv4() {
        32
    } else {
        128
    }
}

/// The prefix length of a netmask, if it is one (contiguous ones, then zeros).
fn mask_bits(mask: IpAddr) -> Option<u8> {
    let (value, width) = match mask {
        IpAddr::V4(v4) => (u128::from(u32::from(v4)) << 96, 32),
        IpAddr::V6(v6) => (u128::from(v6), 128),
    };
    let ones = value.leading_ones();
    (value.checked_shl(ones).unwrap_or(0) == 0 && ones <= width).then_some(ones as u8)
}

fn parse_address(tok: &str, mask: Option<&str>) -> Result<Address, String> {
    if tok == "all" {
        return Ok(Address::All);
    }
    if tok == "samehost" || tok == "samenet" {
        return Err(format!(
            "address keyword {tok:?} is not supported by pgtide; write the addresses as CIDR"
        ));
    }
    let (ip, bits) = match tok.split_once('/') {
        Some((ip, bits)) => {
            let ip: IpAddr = ip.parse().map_err(|_| {
                format!("{ip:?} is not an IP address (host names are not supported)")
            })?;
            let bits: u8 = bits
                .parse()
                .ok()
                .filter(|b| *b <= max_bits(ip))
                .ok_or_else(|| {
                    format!(
                        "{bits:?} is not a prefix length for {ip} (0 to {})",
                        max_bits(ip)
                    )
                })?;
            (ip, bits)
        }
        None => {
            let ip: IpAddr = tok.parse().map_err(|_| {
                format!(
                    "{tok:?} is not an IP address or CIDR (host names and domains are not supported); write e.g. 10.0.0.0/8 or ::1/128"
                )
            })?;
            let mask = mask.ok_or_else(|| {
                format!(
                    "the address {ip} has no prefix length and no mask; write {ip}/{}",
                    max_bits(ip)
                )
            })?;
            let m: IpAddr = mask
                .parse()
                .map_err(|_| format!("{mask:?} is not an IP mask"))?;
            if m.is_ipv4() != ip.is_ipv4() {
                return Err(format!(
                    "the mask {m} is not of the same IP version as the address {ip}"
                ));
            }
            let bits = mask_bits(m)
                .ok_or_else(|| format!("{m} is not a valid mask (ones followed by zeros)"))?;
            (ip, bits)
        }
    };
    Ok(Address::Net(masked(ip, bits), bits))
}

fn parse_line(line: usize, text: &str) -> Result<Option<HbaRule>, String> {
    let f = fields(text)?;
    if f.is_empty() {
        return Ok(None);
    }
    let single = |i: usize, what: &str| -> Result<&str, String> {
        let field = f.get(i).ok_or_else(|| {
            format!("the {what} is missing; a line is TYPE DATABASE USER [ADDRESS] METHOD")
        })?;
        match field.as_slice() {
            [t] => Ok(t.text.as_str()),
            _ => Err(format!("the {what} cannot be a list")),
        }
    };
    let conn = match single(0, "connection type")? {
        "local" => ConnType::Local,
        "host" => ConnType::Host,
        "hostssl" => ConnType::HostSsl,
        "hostnossl" => ConnType::HostNoSsl,
        other => {
            return Err(format!(
                "connection type {other:?} is not supported; use local, host, hostssl or hostnossl"
            ))
        }
    };
    let databases = names(
        f.get(1)
            .ok_or("the database is missing; a line is TYPE DATABASE USER [ADDRESS] METHOD")?,
        "database",
    )?;
    let users = names(
        f.get(2)
            .ok_or("the user is missing; a line is TYPE DATABASE USER [ADDRESS] METHOD")?,
        "user",
    )?;
    let (address, method_at) = if conn == ConnType::Local {
        (Address::All, 3)
    } else {
        let addr = single(3, "address")?;
        // An address without '/' takes the next field as its mask.
        let takes_mask = addr != "all" && !addr.contains('/') && addr.parse::<IpAddr>().is_ok();
        let mask = if takes_mask {
            Some(single(4, "IP mask")?)
        } else {
            None
        };
        (parse_address(addr, mask)?, if takes_mask { 5 } else { 4 })
    };
    let method = HbaMethod::parse(single(method_at, "authentication method")?)?;
    if method == HbaMethod::Cert && conn != ConnType::HostSsl {
        // As PostgreSQL: a client certificate comes only with TLS.
        return Err(
            "method cert is only supported on hostssl lines (a client certificate needs TLS)"
                .into(),
        );
    }
    if let Some(extra) = f.get(method_at + 1).and_then(|t| t.first()) {
        return Err(format!(
            "option {:?} after the method is not supported by pgtide; remove it",
            extra.text
        ));
    }
    Ok(Some(HbaRule {
        line,
        conn,
        databases,
        users,
        address,
        method,
    }))
}

impl HbaRules {
    /// Parses a file's text; an error is `line N: what is wrong`.
    pub fn parse(text: &str) -> Result<HbaRules, String> {
        let mut rules = Vec::new();
        let mut logical = String::new();
        let mut start = 0;
        for (i, raw) in text.lines().enumerate() {
            if logical.is_empty() {
                start = i + 1;
            }
            // A backslash at the end continues the line (PostgreSQL 16).
            if let Some(head) = raw.strip_suffix('\\') {
                logical.push_str(head);
                logical.push(' ');
                continue;
            }
            logical.push_str(raw);
            let rule = parse_line(start, &logical).map_err(|e| format!("line {start}: {e}"))?;
            rules.extend(rule);
            logical.clear();
        }
        if !logical.trim().is_empty() {
            let rule = parse_line(start, &logical).map_err(|e| format!("line {start}: {e}"))?;
            rules.extend(rule);
        }
        Ok(HbaRules { rules })
    }

    /// What cannot work with the client TLS setup pgtide runs with: `hostssl` lines when
    /// client TLS is off (`tls`: `client_tls_sslmode` is not "disable"; PostgreSQL refuses
    /// them with `ssl = off` too), and `cert` lines when pgtide asks clients for no
    /// certificate (`client_certificates`: a `client_tls_ca_file` is set). One message per
    /// line, `line N: ...`.
    pub fn tls_problems(&self, tls: bool, client_certificates: bool) -> Vec<String> {
        let mut out = Vec::new();
        for r in &self.rules {
            if r.conn == ConnType::HostSsl && !tls {
                out.push(format!(
                    "line {}: a hostssl line cannot match while client TLS is off (client_tls_sslmode = \"disable\"); set client_tls_sslmode and its certificate files, or make it a host line",
                    r.line
                ));
            } else if r.method == HbaMethod::Cert && !client_certificates {
                out.push(format!(
                    "line {}: method cert needs client certificates, and pgtide asks for none without client_tls_ca_file; set client_tls_ca_file",
                    r.line
                ));
            }
        }
        out
    }

    /// Reads and parses `path`.
    pub fn load(path: &str) -> Result<HbaRules, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?;
        Self::parse(&text).map_err(|e| format!("{path}: {e}"))
    }

    /// The first rule matching a TCP connection from `peer` for `database` and `user`;
    /// `None` means no line matches (the connection must be refused).
    pub fn find(&self, peer: &Peer, database: &str, user: &str) -> Option<&HbaRule> {
        let ip = peer.addr.ip().to_canonical();
        self.rules.iter().find(|r| {
            let conn = match r.conn {
                ConnType::Local => false,
                ConnType::Host => true,
                ConnType::HostSsl => peer.tls,
                ConnType::HostNoSsl => !peer.tls,
            };
            let address = match r.address {
                Address::All => true,
                Address::Net(net, bits) => net.is_ipv4() == ip.is_ipv4() && masked(ip, bits) == net,
            };
            let db = r.databases.iter().any(|n| match n {
                Name::All => true,
                Name::SameUser => database == user,
                Name::Replication => false,
                Name::Exact(d) => d == database,
            });
            let u = r.users.iter().any(|n| match n {
                Name::All => true,
                Name::Exact(u) => u == user,
                Name::SameUser | Name::Replication => false,
            });
            conn && address && db && u
        })
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(addr: &str, tls: bool, cn: Option<&str>) -> Peer {
        Peer {
            addr: addr.parse().unwrap(),
            tls,
            cert_common_name: cn.map(str::to_string),
        }
    }

    fn method(rules: &HbaRules, p: &Peer, db: &str, user: &str) -> Option<HbaMethod> {
        rules.find(p, db, user).map(|r| r.method)
    }

    const FILE: &str = r#"
# TYPE  DATABASE        USER            ADDRESS                 METHOD
local   all             all                                     trust
host    all             blocked         0.0.0.0/0               reject
hostssl app             alice           10.0.0.0/8              cert
hostnossl app           alice           10.0.0.0/8              md5
host    app,"all"       bob, carol      192.168.1.0 255.255.255.0 password   # a comment
host    sameuser        all             127.0.0.1/32            scram-sha-256
host    all             all             ::1/128                 trust
host    reports         all             fd00::/8                md5
host    all             "all"           all                     \
        md5
"#;

    #[test]
    fn first_matching_line_decides() {
        let r = HbaRules::parse(FILE).unwrap();
        assert_eq!(r.len(), 9);
        let lo = peer("127.0.0.1:5000", false, None);
        assert_eq!(method(&r, &lo, "x", "blocked"), Some(HbaMethod::Reject));
        // sameuser: database named like the user.
        assert_eq!(
            method(&r, &lo, "dave", "dave"),
            Some(HbaMethod::ScramSha256)
        );
        assert_eq!(method(&r, &lo, "app", "dave"), None);
        // A quoted "all" is a user named all.
        assert_eq!(method(&r, &lo, "app", "all"), Some(HbaMethod::Md5));
        // The last line's rule was continued with a backslash.
        assert_eq!(r.find(&lo, "app", "all").unwrap().line, 11);
    }

    #[test]
    fn tls_and_cert_lines() {
        let r = HbaRules::parse(FILE).unwrap();
        let tls = peer("10.1.2.3:5000", true, Some("alice"));
        let plain = peer("10.1.2.3:5000", false, None);
        assert_eq!(method(&r, &tls, "app", "alice"), Some(HbaMethod::Cert));
        assert_eq!(method(&r, &plain, "app", "alice"), Some(HbaMethod::Md5));
        assert_eq!(method(&r, &plain, "other", "alice"), None);
    }

    #[test]
    fn addresses_lists_and_masks() {
        let r = HbaRules::parse(FILE).unwrap();
        let lan = peer("192.168.1.77:1", false, None);
        assert_eq!(method(&r, &lan, "app", "bob"), Some(HbaMethod::Password));
        assert_eq!(method(&r, &lan, "all", "carol"), Some(HbaMethod::Password));
        assert_eq!(method(&r, &lan, "other", "carol"), None);
        assert_eq!(
            method(&r, &peer("192.168.2.77:1", false, None), "app", "bob"),
            None
        );
        // IPv6 CIDR, and IPv4 entries do not match IPv6 clients.
        assert_eq!(
            method(&r, &peer("[::1]:1", false, None), "x", "y"),
            Some(HbaMethod::Trust)
        );
        assert_eq!(
            method(&r, &peer("[fd12:3456::1]:1", false, None), "reports", "y"),
            Some(HbaMethod::Md5)
        );
        assert_eq!(
            method(&r, &peer("[fd12:3456::1]:1", false, None), "x", "y"),
            None
        );
        // An IPv4 client seen through an IPv6 socket matches IPv4 lines.
        assert_eq!(
            method(&r, &peer("[::ffff:127.0.0.1]:1", false, None), "u", "u"),
            Some(HbaMethod::ScramSha256)
        );
    }

    #[test]
    fn unsupported_things_are_refused_with_the_line() {
        for (line, needle) in [
            (
                "host all +admins 0.0.0.0/0 md5",
                "group membership \"+admins\"",
            ),
            ("host all @users 0.0.0.0/0 md5", "file inclusion"),
            ("host samerole all 0.0.0.0/0 md5", "\"samerole\""),
            ("host all all db.example.com md5", "host names"),
            ("host all all samenet md5", "\"samenet\""),
            ("host all all 10.0.0.0/33 md5", "prefix length"),
            ("host all all 10.0.0.1 255.0.255.0 md5", "not a valid mask"),
            ("host all all 10.0.0.1 md5", "not an IP mask"),
            ("host all all 10.0.0.1/8 ldap", "\"ldap\" is not supported"),
            (
                "host all all 10.0.0.1/8 md5 clientcert=verify-full",
                "option",
            ),
            ("hostgssenc all all 10.0.0.1/8 md5", "connection type"),
            ("host all", "the user is missing"),
            ("host all all", "the address is missing"),
            ("host all all 0.0.0.0/0", "method is missing"),
            ("host \"app all all 0.0.0.0/0 md5", "not closed"),
            ("host app, all 0.0.0.0/0", "address is missing"),
            (
                "host all all 0.0.0.0/0 cert",
                "only supported on hostssl lines",
            ),
            (
                "hostnossl all all 0.0.0.0/0 cert",
                "only supported on hostssl lines",
            ),
            ("local all all cert", "only supported on hostssl lines"),
        ] {
            let text = format!("# header\n{line}\n");
            let e = HbaRules::parse(&text).unwrap_err();
            assert!(e.starts_with("line 2: "), "{line}: {e}");
            assert!(e.contains(needle), "{line}: {e}");
        }
    }

    #[test]
    fn lines_that_need_client_tls() {
        let r = HbaRules::parse(FILE).unwrap();
        // TLS on with a client CA: every line can do what it says.
        assert!(r.tls_problems(true, true).is_empty());
        // TLS on, no client CA: the cert line (line 5) can never succeed.
        let p = r.tls_problems(true, false);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].starts_with("line 5: method cert needs client certificates"),
            "{p:?}"
        );
        // TLS off: the hostssl line can never match.
        let p = r.tls_problems(false, false);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].starts_with("line 5: a hostssl line cannot match"),
            "{p:?}"
        );
        // hostnossl and host lines need nothing.
        let plain = HbaRules::parse("hostnossl all all all md5\nhost all all all trust\n").unwrap();
        assert!(plain.tls_problems(false, false).is_empty());
    }

    #[test]
    fn local_lines_never_match_tcp() {
        let r = HbaRules::parse("local all all trust\n").unwrap();
        assert_eq!(
            method(&r, &peer("127.0.0.1:1", false, None), "a", "b"),
            None
        );
    }

    #[test]
    fn masks() {
        assert_eq!(mask_bits("255.255.255.0".parse().unwrap()), Some(24));
        assert_eq!(mask_bits("0.0.0.0".parse().unwrap()), Some(0));
        assert_eq!(mask_bits("255.255.255.255".parse().unwrap()), Some(32));
        assert_eq!(mask_bits("ffff:ffff::".parse().unwrap()), Some(32));
        assert_eq!(mask_bits("255.0.255.0".parse().unwrap()), None);
    }
}
