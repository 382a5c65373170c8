//! The layers, lowest first: built-in defaults < TOML file (`--config` or
//! `KLAVI_SIDECAR_CONFIG`) < environment < command-line flags, merged by
//! figment into a [`RawConfig`].
//!
//! Environment keys are `KLAVI_SIDECAR_<SECTION>__<KEY>`, and for profiles
//! `KLAVI_SIDECAR_PROFILES__<NAME>__<KEY>` and
//! `KLAVI_SIDECAR_PROFILES__<NAME>__REFRESH__<KEY>`: split on `__` and
//! lower-cased, so any key nests without a table of names. Every value is
//! handed over as a string; the types read it ([`super::lenient`]). The
//! default profile's keys also come from `KLAVI_ACCESS_KEY`,
//! `KLAVI_SECRET_KEY` and their `_FILE` forms, below the prefixed ones.

use std::path::{Path, PathBuf};

use figment::providers::{Format, Serialized, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};

use super::ConfigError;
use super::raw::RawConfig;

/// Prefix of the environment keys.
pub const ENV_PREFIX: &str = "KLAVI_SIDECAR_";
/// Environment variable naming the TOML file.
pub const CONFIG_ENV: &str = "KLAVI_SIDECAR_CONFIG";

/// Short environment names for the default profile's keys, as Kubernetes
/// and Docker users expect them, and the key each one sets.
const SHORT_ENV: [(&str, &str); 4] = [
    ("KLAVI_ACCESS_KEY", "klavi.access_key"),
    ("KLAVI_SECRET_KEY", "klavi.secret_key"),
    ("KLAVI_ACCESS_KEY_FILE", "klavi.access_key_file"),
    ("KLAVI_SECRET_KEY_FILE", "klavi.secret_key_file"),
];

/// Values given on the command line, the top layer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// `--listen`: `server.listen`.
    pub listen: Option<String>,
    /// `--ops-listen`: `server.ops_listen`.
    pub ops_listen: Option<String>,
    /// `--log-format`: `log.format`.
    pub log_format: Option<String>,
}

/// Where the configuration comes from. The environment is passed in, not
/// read behind the caller's back, so tests need not touch the process's.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// `--config PATH`; when `None`, `KLAVI_SIDECAR_CONFIG` from `env`.
    pub file: Option<PathBuf>,
    /// Environment variables (all of them; irrelevant ones are ignored).
    pub env: Vec<(String, String)>,
    /// Command-line flags.
    pub overrides: Overrides,
}

impl Sources {
    /// Sources from this process's environment.
    pub fn from_process(file: Option<PathBuf>, overrides: Overrides) -> Self {
        Self {
            file,
            env: std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
                .collect(),
            overrides,
        }
    }

    fn env_var(&self, name: &str) -> Option<&str> {
        self.env
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The TOML file in effect, if any.
    pub fn config_file(&self) -> Option<PathBuf> {
        self.file.clone().or_else(|| {
            self.env_var(CONFIG_ENV)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        })
    }
}

/// A figment provider for a list of (dotted key, value) pairs, with a name
/// for error messages that maps keys back to where the user wrote them.
struct KeyValues {
    metadata: Metadata,
    pairs: Vec<(String, String)>,
}

impl Provider for KeyValues {
    fn metadata(&self) -> Metadata {
        self.metadata.clone()
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut dict = Dict::new();
        for (key, value) in &self.pairs {
            if let Some(nested) = figment::util::nest(key, Value::from(value.clone())).into_dict() {
                dict = merge_dicts(dict, nested);
            }
        }
        Ok(Profile::Default.collect(dict))
    }
}

fn merge_dicts(mut base: Dict, other: Dict) -> Dict {
    for (key, value) in other {
        let merged = match (base.remove(&key), value) {
            (Some(Value::Dict(_, a)), Value::Dict(tag, b)) => Value::Dict(tag, merge_dicts(a, b)),
            (_, value) => value,
        };
        base.insert(key, merged);
    }
    base
}

/// `KLAVI_SIDECAR_SERVER__LISTEN` for `server.listen`.
fn env_name(key: &str) -> String {
    format!(
        "{ENV_PREFIX}{}",
        key.replace('.', "__").to_ascii_uppercase()
    )
}

fn short_env_layer(sources: &Sources) -> KeyValues {
    let pairs = SHORT_ENV
        .iter()
        .filter_map(|(name, key)| Some((key.to_string(), sources.env_var(name)?.to_string())))
        .collect();
    KeyValues {
        metadata: Metadata::named("environment variable").interpolater(|_, keys| {
            let key = keys.join(".");
            SHORT_ENV
                .iter()
                .find(|(_, k)| *k == key)
                .map_or_else(|| env_name(&key), |(name, _)| name.to_string())
        }),
        pairs,
    }
}

fn prefixed_env_layer(sources: &Sources) -> KeyValues {
    let pairs = sources
        .env
        .iter()
        .filter_map(|(name, value)| {
            let rest = name.strip_prefix(ENV_PREFIX)?;
            if name == CONFIG_ENV || rest.is_empty() {
                return None;
            }
            let key = rest
                .split("__")
                .map(str::to_ascii_lowercase)
                .collect::<Vec<_>>()
                .join(".");
            Some((key, value.clone()))
        })
        .collect();
    KeyValues {
        metadata: Metadata::named("environment variable")
            .interpolater(|_, keys| env_name(&keys.join("."))),
        pairs,
    }
}

fn overrides_layer(overrides: &Overrides) -> KeyValues {
    let flags = [
        ("server.listen", &overrides.listen),
        ("server.ops_listen", &overrides.ops_listen),
        ("log.format", &overrides.log_format),
    ];
    KeyValues {
        metadata: Metadata::named("command-line flag").interpolater(|_, keys| {
            match keys.join(".").as_str() {
                "server.listen" => "--listen".into(),
                "server.ops_listen" => "--ops-listen".into(),
                other => format!("--{}", other.replace(['.', '_'], "-")),
            }
        }),
        pairs: flags
            .iter()
            .filter_map(|(key, value)| Some((key.to_string(), (*value).clone()?)))
            .collect(),
    }
}

/// Merges every layer into the raw configuration, without validating it.
pub fn load_raw(sources: &Sources) -> Result<RawConfig, ConfigError> {
    match sources.config_file() {
        Some(path) => {
            let text = std::fs::read_to_string(&path).map_err(|e| {
                ConfigError::new("--config", format!("cannot read {}: {e}", path.display()))
            })?;
            raw_from(Some((&path, &text)), sources)
        }
        None => raw_from(None, sources),
    }
}

/// A TOML file's text as a figment layer, named after the file.
struct TomlText<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Provider for TomlText<'_> {
    fn metadata(&self) -> Metadata {
        Metadata::from("TOML file", figment::Source::File(self.path.to_path_buf()))
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Toml::string(self.text).data()
    }
}

/// Merges the layers, the file given as text (`(path, text)`), without
/// validating. Never touches the file system.
pub fn raw_from(file: Option<(&Path, &str)>, sources: &Sources) -> Result<RawConfig, ConfigError> {
    let mut figment = Figment::from(Serialized::defaults(RawConfig::default()));
    if let Some((path, text)) = file {
        // Parse once here so a syntax error names the file on one line.
        toml::from_str::<toml::Table>(text).map_err(|e| {
            ConfigError::new(
                "--config",
                format!("{} is not valid TOML: {}", path.display(), e.message()),
            )
        })?;
        figment = figment.merge(TomlText { path, text });
    }
    figment = figment
        .merge(short_env_layer(sources))
        .merge(prefixed_env_layer(sources))
        .merge(overrides_layer(&sources.overrides));
    figment.extract().map_err(ConfigError::from_figment)
}
