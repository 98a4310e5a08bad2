//! Where the running configuration comes from: a file, plus the command-line overrides
//! that apply on top of it at start and again at every reload ([`Overrides::apply`], the
//! one place they are merged).

use std::net::SocketAddr;
use std::path::PathBuf;

use super::{Config, ConfigError};

/// Settings given on the command line, which win over the file's.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Overrides {
    /// `--listen`.
    pub listen: Option<SocketAddr>,
    /// `--metrics-listen` (`""` turns the endpoint off).
    pub metrics_listen: Option<String>,
}

impl Overrides {
    /// Puts the overrides into `config`.
    pub fn apply(&self, config: &mut Config) {
        if let Some(l) = self.listen {
            config.pgtide.listen = l;
        }
        if let Some(m) = &self.metrics_listen {
            config.pgtide.metrics_listen = m.clone();
        }
    }
}

/// Where the running configuration came from: the file `RELOAD` and SIGHUP read again,
/// and the overrides applied to it each time.
#[derive(Clone, Debug)]
pub struct ConfigSource {
    pub path: PathBuf,
    pub overrides: Overrides,
}

impl ConfigSource {
    /// A source with no command-line overrides.
    pub fn file(path: impl Into<PathBuf>) -> ConfigSource {
        ConfigSource {
            path: path.into(),
            overrides: Overrides::default(),
        }
    }

    /// Reads and validates the file and applies the overrides.
    pub fn load(&self) -> Result<Config, ConfigError> {
        let mut config = Config::from_file(&self.path)?;
        self.overrides.apply(&mut config);
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_win_over_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pooler.toml");
        std::fs::write(
            &path,
            "[pgtide]\nlisten = \"127.0.0.1:7000\"\nmetrics_listen = \"127.0.0.1:7001\"\n[databases.app]\n",
        )
        .unwrap();
        let plain = ConfigSource::file(&path).load().unwrap();
        assert_eq!(plain.pgtide.listen.port(), 7000);
        let source = ConfigSource {
            path,
            overrides: Overrides {
                listen: Some("127.0.0.1:7100".parse().unwrap()),
                metrics_listen: Some(String::new()),
            },
        };
        let c = source.load().unwrap();
        assert_eq!(c.pgtide.listen.port(), 7100);
        assert_eq!(c.pgtide.metrics_listen, "");
    }
}
