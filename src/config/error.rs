//! A bad configuration as one line naming the key.

/// A bad configuration: which key, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct ConfigError {
    /// The key (`server.listen`, `profiles.mgmt.secret_key_file`), or the
    /// flag or file at fault.
    pub key: String,
    /// What is wrong, on one line.
    pub message: String,
}

impl ConfigError {
    /// An error about `key`; the message is folded onto one line.
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: one_line(&message.into()),
        }
    }

    /// Figment's error, with the key it names, where the value came from,
    /// and never the value of a secret key.
    pub(super) fn from_figment(error: figment::Error) -> Self {
        let key = if error.path.is_empty() {
            "configuration".to_string()
        } else {
            error.path.join(".")
        };
        // Figment quotes the offending value; for a key, that is the secret.
        // An unknown field quotes no value, and saying so helps.
        let unknown_field = matches!(error.kind, figment::error::Kind::UnknownField(..));
        let mut message = if is_secret_key(&key) && !unknown_field {
            "must be a string (the value is not shown)".to_string()
        } else {
            error.kind.to_string()
        };
        if let Some(metadata) = &error.metadata {
            let origin = match (&error.profile, error.path.is_empty()) {
                (Some(profile), false) => metadata.interpolate(profile, &error.path),
                _ => metadata.name.to_string(),
            };
            match &metadata.source {
                Some(source) => message.push_str(&format!(" (in {} {source})", metadata.name)),
                None => message.push_str(&format!(" (from {origin})")),
            }
        }
        Self::new(key, message)
    }
}

/// `klavi.access_key`, `profiles.NAME.secret_key` and the like: keys whose
/// values are never quoted.
pub(super) fn is_secret_key(key: &str) -> bool {
    key.ends_with("access_key") || key.ends_with("secret_key")
}

/// Collapses a multi-line message (TOML parse errors draw pictures) to one.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}
