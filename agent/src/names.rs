//! Typed names made once at the edge: a declared app, a backup id, an
//! operation id and a package version. Holding one proves it was checked.

use crate::config::{AppConfig, Config};

/// Versions are at most this long (a Debian or PEP 440 version fits).
pub const MAX_VERSION_LEN: usize = 64;
/// Operation ids are short (`op-YYYYMMDD-HHMMSS-xxxxxx`).
pub const MAX_OPERATION_ID: usize = 64;
/// Backup ids name directories.
pub const MAX_BACKUP_ID: usize = 128;

/// Why a name was refused; each message names what was asked for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("app is required")]
    AppRequired,
    #[error("no app {name:?} is declared on this host (declared: {declared})")]
    UnknownApp { name: String, declared: String },
    #[error("{0:?} is not a backup id")]
    BackupId(String),
    #[error("operation id is empty")]
    OperationIdEmpty,
    #[error(
        "operation id is {0} bytes long; ids have at most {MAX_OPERATION_ID} (see `covetctl ops list`)"
    )]
    OperationIdTooLong(usize),
    #[error("operation id may hold only letters, digits, '-' and '_' (see `covetctl ops list`)")]
    OperationIdChars,
    #[error(
        "invalid version {0:?}: use 1 to {MAX_VERSION_LEN} letters, digits and `. + ! - _`, not starting with `-` or `.`, without `..`"
    )]
    Version(String),
}

/// An app this host declares, with its declaration.
#[derive(Debug, Clone)]
pub struct AppName {
    app: AppConfig,
}

impl AppName {
    /// `name` if the configuration declares it.
    pub fn declared(config: &Config, name: &str) -> Result<AppName, NameError> {
        if name.is_empty() {
            return Err(NameError::AppRequired);
        }
        match config.app(name) {
            Some(app) => Ok(AppName { app: app.clone() }),
            None => {
                let known: Vec<&str> = config.apps.iter().map(|a| a.name.as_str()).collect();
                Err(NameError::UnknownApp {
                    name: name.to_owned(),
                    declared: if known.is_empty() {
                        "none".to_owned()
                    } else {
                        known.join(", ")
                    },
                })
            }
        }
    }

    pub fn as_str(&self) -> &str {
        &self.app.name
    }

    /// The app's declaration in the configuration it was admitted by.
    pub fn config(&self) -> &AppConfig {
        &self.app
    }

    pub fn into_config(self) -> AppConfig {
        self.app
    }
}

/// A backup id: letters, digits, `-`, `_`, `.`, not leading `.` (it names a
/// directory, so never `..` or a path).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BackupId(String);

impl BackupId {
    pub fn parse(id: &str) -> Result<BackupId, NameError> {
        let ok = !id.is_empty()
            && id.len() <= MAX_BACKUP_ID
            && !id.starts_with('.')
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if ok {
            Ok(BackupId(id.to_owned()))
        } else {
            Err(NameError::BackupId(id.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An operation id: 1 to 64 of `[A-Za-z0-9_-]`, refused otherwise before
/// it reaches the operation log.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OperationId(String);

impl OperationId {
    pub fn parse(id: &str) -> Result<OperationId, NameError> {
        if id.is_empty() {
            return Err(NameError::OperationIdEmpty);
        }
        if id.len() > MAX_OPERATION_ID {
            return Err(NameError::OperationIdTooLong(id.len()));
        }
        if !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(NameError::OperationIdChars);
        }
        Ok(OperationId(id.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A package version as it may reach a package tool's argv or a file name:
/// 1 to 64 of letters, digits and `. + ! - _`, not starting with `-` (an
/// option) or `.`, without `..` (a path).
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct Version(String);

impl Version {
    pub fn parse(v: &str) -> Result<Version, NameError> {
        if Version::is_safe(v) {
            Ok(Version(v.to_owned()))
        } else {
            Err(NameError::Version(v.to_owned()))
        }
    }

    /// The rule itself, for `packages::Version`, which borrows.
    pub fn is_safe(v: &str) -> bool {
        let allowed =
            |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '+' | '!' | '-' | '_');
        (1..=MAX_VERSION_LEN).contains(&v.len())
            && v.chars().all(allowed)
            && !v.starts_with(['-', '.'])
            && !v.contains("..")
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<Version> for String {
    fn from(v: Version) -> String {
        v.0
    }
}

/// A stored version (an operation's spec) is checked again when read.
impl TryFrom<String> for Version {
    type Error = NameError;
    fn try_from(v: String) -> Result<Version, NameError> {
        Version::parse(&v)
    }
}

/// A version reads as the string it was parsed from.
impl std::ops::Deref for Version {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prop_assert;

    #[test]
    fn an_app_name_is_a_declared_app() {
        let mut c = crate::edge::api::testing::config();
        let app = AppName::declared(&c, "bare").unwrap();
        assert_eq!(app.as_str(), "bare");
        assert_eq!(app.config().unit, "bare.service");
        assert_eq!(
            AppName::declared(&c, "").unwrap_err(),
            NameError::AppRequired
        );
        let e = AppName::declared(&c, "other").unwrap_err();
        assert_eq!(
            e.to_string(),
            "no app \"other\" is declared on this host (declared: covet, bare)"
        );
        c.apps.clear();
        let e = AppName::declared(&c, "covet").unwrap_err();
        assert!(e.to_string().ends_with("(declared: none)"), "{e}");
    }

    #[test]
    fn backup_ids_name_one_directory() {
        for good in ["covet-20261201-221500", "a.b_c-1", &"x".repeat(128)] {
            assert_eq!(BackupId::parse(good).unwrap().as_str(), good);
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "../x",
            "a b",
            "a\0",
            &"x".repeat(129),
        ] {
            assert_eq!(
                BackupId::parse(bad),
                Err(NameError::BackupId(bad.to_owned())),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn operation_ids_are_short_and_plain() {
        let id = OperationId::parse("op-20261201-221500-a1b2c3").unwrap();
        assert_eq!(id.as_str(), "op-20261201-221500-a1b2c3");
        assert!(OperationId::parse(&"x".repeat(64)).is_ok());
        assert_eq!(OperationId::parse(""), Err(NameError::OperationIdEmpty));
        assert_eq!(
            OperationId::parse(&"x".repeat(65)),
            Err(NameError::OperationIdTooLong(65))
        );
        for bad in ["op/../x", "op 1", "op\n", "op.1", "ö"] {
            assert_eq!(
                OperationId::parse(bad),
                Err(NameError::OperationIdChars),
                "{bad:?}"
            );
        }
        assert!(
            NameError::OperationIdTooLong(65)
                .to_string()
                .contains("at most 64")
        );
    }

    #[test]
    fn versions_reach_argv_and_paths_safely() {
        for good in [
            "1.2.3",
            "1.0-1",
            "1.0+local",
            "1!2.0",
            "0.2.0_rc1",
            &"9".repeat(64),
        ] {
            assert_eq!(Version::parse(good).unwrap().as_str(), good);
        }
        for bad in [
            "",
            "-1",
            ".1",
            "1..2",
            "1/2",
            "1 2",
            "1;rm",
            "1\n",
            &"9".repeat(65),
        ] {
            assert_eq!(
                Version::parse(bad),
                Err(NameError::Version(bad.to_owned())),
                "{bad:?}"
            );
        }
        assert!(
            NameError::Version("x y".into())
                .to_string()
                .starts_with("invalid version \"x y\"")
        );
    }

    #[test]
    fn fuzz_accepted_names_are_never_paths_or_options() {
        crate::fuzzing::run(2000, "[A-Za-z0-9._+!/ -]{0,70}", |s| {
            if let Ok(v) = Version::parse(&s) {
                prop_assert!(!v.as_str().contains('/') && !v.as_str().contains(".."));
                prop_assert!(!v.as_str().starts_with('-'));
            }
            if let Ok(b) = BackupId::parse(&s) {
                prop_assert!(!b.as_str().contains('/') && !b.as_str().starts_with('.'));
            }
            if let Ok(o) = OperationId::parse(&s) {
                prop_assert!((1..=MAX_OPERATION_ID).contains(&o.as_str().len()));
            }
            Ok(())
        });
    }
}
