//! Secret values: where they come from (`env:`, `file:`, literal) and a type that cannot be printed.

use std::fmt;

use secrecy::{ExposeSecret, SecretString};

/// A credential value. `Debug` and `Display` print `[redacted]`, so a secret that reaches a log line
/// or an error message by mistake still does not leak.
#[derive(Clone)]
pub struct Secret(SecretString);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(SecretString::from(value.into()))
    }

    /// The only way to read the value. Callers must put it straight into a sensitive header value.
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Where a secret's value is read from, as written in the config file.
#[derive(Debug, PartialEq, Eq)]
pub enum Source<'a> {
    Env(&'a str),
    File(&'a str),
    /// A systemd credential: `$CREDENTIALS_DIRECTORY/NAME` (`LoadCredential=NAME:…`).
    Credential(&'a str),
    Literal,
}

/// `env:NAME`, `file:PATH`, `credential:NAME`, or anything else as a literal value.
pub fn source_of(reference: &str) -> Source<'_> {
    if let Some(name) = reference.strip_prefix("credential:") {
        Source::Credential(name)
    } else if let Some(name) = reference.strip_prefix("env:") {
        Source::Env(name)
    } else if let Some(path) = reference.strip_prefix("file:") {
        Source::File(path)
    } else {
        Source::Literal
    }
}

/// Where systemd put credential `name`: `$CREDENTIALS_DIRECTORY/NAME`.
pub fn credential_path(name: &str) -> Result<std::path::PathBuf, String> {
    if name.is_empty() || name.contains('/') || name == ".." {
        return Err(format!(
            "`credential:{name}` needs a credential name (no `/`)"
        ));
    }
    let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY").filter(|d| !d.is_empty()) else {
        return Err(format!(
            "credential:{name}: $CREDENTIALS_DIRECTORY is not set (systemd sets it for a unit with LoadCredential={name}:…)"
        ));
    };
    Ok(std::path::Path::new(&dir).join(name))
}

/// Reads a secret reference. The error text never contains the value, only where it was looked for.
pub fn resolve(reference: &str) -> Result<Secret, String> {
    match source_of(reference) {
        Source::Credential(name) => {
            let path = credential_path(name)?;
            resolve(&format!("file:{}", path.display()))
                .map_err(|e| format!("credential:{name}: {e}"))
        }
        Source::Env(name) => match std::env::var(name) {
            Ok(v) if !v.is_empty() => Ok(Secret::new(v)),
            Ok(_) => Err(format!("environment variable {name} is empty")),
            Err(std::env::VarError::NotPresent) => {
                Err(format!("environment variable {name} is not set"))
            }
            Err(std::env::VarError::NotUnicode(_)) => {
                Err(format!("environment variable {name} is not valid UTF-8"))
            }
        },
        Source::File(path) => match std::fs::read_to_string(path) {
            // systemd credentials and `echo secret > file` both end in a newline that is not part
            // of the secret.
            Ok(v) => {
                let v = v.strip_suffix('\n').unwrap_or(&v);
                let v = v.strip_suffix('\r').unwrap_or(v);
                if v.is_empty() {
                    Err(format!("file {path} is empty"))
                } else {
                    Ok(Secret::new(v))
                }
            }
            Err(e) => Err(format!("cannot read file {path}: {e}")),
        },
        Source::Literal => Ok(Secret::new(reference)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_are_redacted() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "[redacted]");
        assert_eq!(format!("{s}"), "[redacted]");
        assert_eq!(format!("{:?}", Some(&s)), "Some([redacted])");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn file_secret_loses_one_trailing_newline() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("key");
        std::fs::write(&p, "abc\n").expect("write");
        let r = resolve(&format!("file:{}", p.display())).expect("resolves");
        assert_eq!(r.expose(), "abc");
    }

    #[test]
    fn credential_names_are_plain_names() {
        let e = resolve("credential:../etc/shadow").expect_err("refused");
        assert!(e.contains("no `/`"), "{e}");
    }

    #[test]
    fn missing_env_names_the_variable_not_a_value() {
        let e = resolve("env:CREDPROXY_TEST_SURELY_UNSET_VAR").expect_err("unset");
        assert_eq!(
            e,
            "environment variable CREDPROXY_TEST_SURELY_UNSET_VAR is not set"
        );
    }
}
