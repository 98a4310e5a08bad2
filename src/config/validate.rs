//! Parsing with precise error reports, semantic checks, and the upstream-URL quick mode.

use std::fmt;

use super::{AuthType, Config, Database, User};

/// Every problem found in a configuration, each with the key it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

/// One problem: the dotted key (`databases.app.port`) and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl ConfigError {
    pub fn single(key: &str, message: impl Into<String>) -> Self {
        ConfigError {
            problems: vec![Problem {
                key: key.to_string(),
                message: message.into(),
            }],
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            if p.key.is_empty() {
                write!(f, "{}", p.message)?;
            } else {
                write!(f, "{}: {}", p.key, p.message)?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

pub(super) fn parse_and_validate(text: &str) -> Result<Config, ConfigError> {
    let config: Config = toml::from_str(text).map_err(|e| ConfigError::single("", e.to_string()))?;
    check(&config)?;
    Ok(config)
}

fn check(config: &Config) -> Result<(), ConfigError> {
    let mut problems = Vec::new();
    if config.databases.is_empty() {
        problems.push(Problem {
            key: "databases".into(),
            message: "no database is configured; add a [databases.NAME] table".into(),
        });
    }
    if config.pgtide.pool_size == 0 {
        problems.push(Problem {
            key: "pgtide.pool_size".into(),
            message: "must be at least 1".into(),
        });
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ConfigError { problems })
    }
}

pub(super) fn from_upstream_url(text: &str) -> Result<Config, ConfigError> {
    let url = url::Url::parse(text)
        .map_err(|e| ConfigError::single("upstream", format!("{text:?} is not a URL: {e}")))?;
    if url.scheme() != "postgres" && url.scheme() != "postgresql" {
        return Err(ConfigError::single(
            "upstream",
            "the URL must start with postgres:// or postgresql://",
        ));
    }
    let user = percent(url.username());
    if user.is_empty() {
        return Err(ConfigError::single("upstream", "the URL must name a user"));
    }
    let password = url.password().map(percent);
    let host = url.host_str().unwrap_or("127.0.0.1").to_string();
    let port = url.port().unwrap_or(5432);
    let dbname = match url.path().trim_start_matches('/') {
        "" => user.clone(),
        p => percent(p),
    };
    let mut config = Config::default();
    config.databases.insert(
        dbname,
        Database {
            host,
            port,
            ..Database::default()
        },
    );
    let auth_type = if password.is_some() {
        AuthType::ScramSha256
    } else {
        AuthType::Trust
    };
    config.users.insert(
        user,
        User {
            password,
            auth_type: Some(auth_type),
            ..User::default()
        },
    );
    check(&config)?;
    Ok(config)
}

fn percent(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_else(|| s.to_string())
}
