//! Edits to an app's environment file (`KEY=value` lines, as systemd's
//! `EnvironmentFile=` and shells read them): the upgrade guide's
//! `sed -i 's/DATABASE_URI=/DATABASE_URL=/'`, done safely.
//!
//! Only the lines an edit touches change; comments, blank lines, order,
//! `export ` prefixes and the quoting of every other line stay byte for byte.
//! Values are secrets: diffs never show them.

use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

const MAX_KEY_LEN: usize = 128;
const MAX_VALUE_LEN: usize = 4096;
const REDACTED: &str = "<redacted>";

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum EnvEdit {
    /// Replaces the value of every `key` line in place, or appends one.
    Set { key: String, value: String },
    /// Renames every `from` line, keeping its position and value.
    Rename { from: String, to: String },
    /// Removes every `key` line.
    Unset { key: String },
}

#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    #[error(
        "invalid environment variable name {0:?}: use letters, digits and `_`, not starting with a digit, at most {MAX_KEY_LEN} characters"
    )]
    InvalidKey(String),
    #[error("invalid value for {key}: {why}")]
    InvalidValue { key: String, why: String },
    #[error("cannot rename {0} to itself")]
    RenameToItself(String),
    #[error("{} has neither {key} nor the name it is renamed to; check the file and the edit", path.display())]
    MissingKey { key: String, path: PathBuf },
    #[error("{} has both {from} and {to}: remove one of them by hand, then retry", path.display())]
    Conflict {
        from: String,
        to: String,
        path: PathBuf,
    },
    #[error("no saved original at {}: nothing to restore from", keep.display())]
    NoOriginal { keep: PathBuf },
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
}

/// Validates edits from the network: keys `[A-Za-z_][A-Za-z0-9_]*` (at most
/// 128 characters), values without NUL, CR or LF (at most 4096 bytes).
pub fn validate(edits: &[EnvEdit]) -> Result<(), EnvError> {
    for edit in edits {
        match edit {
            EnvEdit::Set { key, value } => {
                validate_key(key)?;
                validate_value(key, value)?;
            }
            EnvEdit::Rename { from, to } => {
                validate_key(from)?;
                validate_key(to)?;
                if from == to {
                    return Err(EnvError::RenameToItself(from.clone()));
                }
            }
            EnvEdit::Unset { key } => validate_key(key)?,
        }
    }
    Ok(())
}

/// The diff the edits would make, values redacted
/// (`- DATABASE_URI=<redacted>`, `+ DATABASE_URL=<redacted>`), without
/// writing anything. Fails as [`apply`] would.
pub fn plan(path: &Path, edits: &[EnvEdit]) -> Result<Vec<String>, EnvError> {
    validate(edits)?;
    let path = resolve(path)?;
    let mut file = EnvFile::parse(&read_text(&path)?);
    file.apply_all(edits, &path)
}

/// Applies the edits in order and replaces the file atomically, keeping its
/// mode and owner. The original is first saved at `keep` unless `keep`
/// already exists, so that a retry after a crash still keeps the true
/// original. Applying the same edits again changes nothing. Returns the
/// redacted diff.
pub fn apply(path: &Path, edits: &[EnvEdit], keep: &Path) -> Result<Vec<String>, EnvError> {
    validate(edits)?;
    let path = resolve(path)?;
    let original = read_text(&path)?;
    let mut file = EnvFile::parse(&original);
    let diff = file.apply_all(edits, &path)?;
    let meta = metadata(&path)?;
    if !keep.exists() {
        write_atomically(keep, original.as_bytes(), &meta)?;
    }
    if !diff.is_empty() {
        write_atomically(&path, file.render().as_bytes(), &meta)?;
    }
    Ok(diff)
}

/// Puts the original saved by [`apply`] back atomically (same mode and
/// owner as the saved copy). Safe to run more than once.
pub fn restore(path: &Path, keep: &Path) -> Result<(), EnvError> {
    let path = resolve(path)?;
    let original = match fs::read(keep) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(EnvError::NoOriginal {
                keep: keep.to_owned(),
            });
        }
        Err(source) => return Err(io_error(format!("reading {}", keep.display()), source)),
    };
    write_atomically(&path, &original, &metadata(keep)?)
}

fn validate_key(key: &str) -> Result<(), EnvError> {
    let mut chars = key.chars();
    let starts_well = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if starts_well && rest_ok && key.len() <= MAX_KEY_LEN {
        Ok(())
    } else {
        Err(EnvError::InvalidKey(key.to_owned()))
    }
}

fn validate_value(key: &str, value: &str) -> Result<(), EnvError> {
    let why = if value.len() > MAX_VALUE_LEN {
        format!("longer than {MAX_VALUE_LEN} bytes")
    } else if value.contains(['\0', '\r', '\n']) {
        "contains a NUL, CR or LF character".to_owned()
    } else {
        return Ok(());
    };
    Err(EnvError::InvalidValue {
        key: key.to_owned(),
        why,
    })
}

/// The file's lines, each kept verbatim until an edit touches it.
struct EnvFile {
    lines: Vec<String>,
    ends_with_newline: bool,
}

/// Where a `[export ]KEY=` line's key sits, as byte offsets in the line.
struct Assignment {
    key_start: usize,
    key_end: usize,
}

impl EnvFile {
    fn parse(text: &str) -> EnvFile {
        let ends_with_newline = text.ends_with('\n');
        let body = text.strip_suffix('\n').unwrap_or(text);
        let lines = if text.is_empty() {
            Vec::new()
        } else {
            body.split('\n').map(str::to_owned).collect()
        };
        EnvFile {
            lines,
            ends_with_newline,
        }
    }

    fn render(&self) -> String {
        let mut text = self.lines.join("\n");
        if self.ends_with_newline && !self.lines.is_empty() {
            text.push('\n');
        }
        text
    }

    fn apply_all(&mut self, edits: &[EnvEdit], path: &Path) -> Result<Vec<String>, EnvError> {
        let mut diff = Vec::new();
        for edit in edits {
            match edit {
                EnvEdit::Set { key, value } => self.set(key, value, &mut diff),
                EnvEdit::Rename { from, to } => self.rename(from, to, path, &mut diff)?,
                EnvEdit::Unset { key } => self.unset(key, &mut diff),
            }
        }
        Ok(diff)
    }

    /// Indexes of the lines assigning `key`.
    fn positions(&self, key: &str) -> Vec<usize> {
        (0..self.lines.len())
            .filter(|&i| key_of(&self.lines[i]) == Some(key))
            .collect()
    }

    fn set(&mut self, key: &str, value: &str, diff: &mut Vec<String>) {
        let positions = self.positions(key);
        if positions.is_empty() {
            self.lines.push(format!("{key}={}", quote(value)));
            self.ends_with_newline = true;
            diff.push(added(key));
        }
        for i in positions {
            let line = &self.lines[i];
            let Some(at) = assignment(line) else { continue };
            let updated = format!("{}{key}={}", &line[..at.key_start], quote(value));
            if updated != *line {
                self.lines[i] = updated;
                diff.extend([removed(key), added(key)]);
            }
        }
    }

    fn rename(
        &mut self,
        from: &str,
        to: &str,
        path: &Path,
        diff: &mut Vec<String>,
    ) -> Result<(), EnvError> {
        let sources = self.positions(from);
        let has_target = !self.positions(to).is_empty();
        match (sources.is_empty(), has_target) {
            // Already renamed: a retry after success.
            (true, true) => return Ok(()),
            (true, false) => {
                return Err(EnvError::MissingKey {
                    key: from.to_owned(),
                    path: path.to_owned(),
                });
            }
            (false, true) => {
                return Err(EnvError::Conflict {
                    from: from.to_owned(),
                    to: to.to_owned(),
                    path: path.to_owned(),
                });
            }
            (false, false) => {}
        }
        for i in sources {
            let line = &self.lines[i];
            let Some(at) = assignment(line) else { continue };
            self.lines[i] = format!("{}{to}{}", &line[..at.key_start], &line[at.key_end..]);
            diff.extend([removed(from), added(to)]);
        }
        Ok(())
    }

    fn unset(&mut self, key: &str, diff: &mut Vec<String>) {
        let before = self.lines.len();
        self.lines.retain(|line| key_of(line) != Some(key));
        diff.extend((self.lines.len()..before).map(|_| removed(key)));
    }
}

/// Parses `[whitespace][export ]KEY[spaces]=...`; anything else (comments,
/// blank lines, junk) is not an assignment and is left alone.
fn assignment(line: &str) -> Option<Assignment> {
    let indent = line.len() - line.trim_start().len();
    let mut key_start = indent;
    if let Some(after) = line[indent..].strip_prefix("export")
        && after.starts_with([' ', '\t'])
    {
        key_start = line.len() - after.trim_start().len();
    }
    let rest = &line[key_start..];
    let key_len = rest
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(rest.len());
    let key = &rest[..key_len];
    let starts_well = key
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    let after_key = rest[key_len..].trim_start_matches([' ', '\t']);
    (starts_well && after_key.starts_with('=')).then_some(Assignment {
        key_start,
        key_end: key_start + key_len,
    })
}

fn key_of(line: &str) -> Option<&str> {
    assignment(line).map(|at| &line[at.key_start..at.key_end])
}

/// Writes a value so that systemd and POSIX shells both read it back
/// unchanged: bare when it is plain, else single quotes (no escapes inside),
/// else double quotes with backslash, double quote, `$` and backquote escaped.
fn quote(value: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_-.,/:@%+=".contains(c);
    if !value.is_empty() && value.chars().all(plain) {
        value.to_owned()
    } else if !value.contains('\'') {
        format!("'{value}'")
    } else {
        let mut quoted = String::from('"');
        for c in value.chars() {
            if matches!(c, '\\' | '"' | '$' | '`') {
                quoted.push('\\');
            }
            quoted.push(c);
        }
        quoted.push('"');
        quoted
    }
}

fn added(key: &str) -> String {
    format!("+ {key}={REDACTED}")
}

fn removed(key: &str) -> String {
    format!("- {key}={REDACTED}")
}

fn io_error(context: String, source: io::Error) -> EnvError {
    EnvError::Io { context, source }
}

/// Follows a symlinked env file so the write replaces its target, not the link.
fn resolve(path: &Path) -> Result<PathBuf, EnvError> {
    fs::canonicalize(path).map_err(|e| io_error(format!("opening env file {}", path.display()), e))
}

fn read_text(path: &Path) -> Result<String, EnvError> {
    fs::read_to_string(path).map_err(|e| io_error(format!("reading {}", path.display()), e))
}

fn metadata(path: &Path) -> Result<fs::Metadata, EnvError> {
    fs::metadata(path).map_err(|e| io_error(format!("reading attributes of {}", path.display()), e))
}

/// Replaces `path` with `bytes` so that readers see either the old or the
/// new file: a private temp file next to it gets the mode and owner of
/// `like`, is synced, then renamed over `path`, and the directory is synced.
fn write_atomically(path: &Path, bytes: &[u8], like: &fs::Metadata) -> Result<(), EnvError> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let temp = dir.join(format!(".{name}.covet-tmp"));
    let context = |what: &str| format!("{what} {}", temp.display());
    // A leftover from an interrupted write is garbage.
    match fs::remove_file(&temp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error(context("removing stale"), e)),
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        // Secrets: nobody else may read the file before its mode is set.
        .mode(0o600)
        .open(&temp)
        .map_err(|e| io_error(context("creating"), e))?;
    let written = copy_attributes(&file, like)
        .and_then(|()| file.write_all(bytes))
        .and_then(|()| file.sync_all());
    if let Err(e) = written {
        let _ = fs::remove_file(&temp);
        return Err(io_error(context("writing"), e));
    }
    drop(file);
    fs::rename(&temp, path).map_err(|e| {
        let _ = fs::remove_file(&temp);
        io_error(format!("replacing {}", path.display()), e)
    })?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error(format!("syncing directory {}", dir.display()), e))
}

/// Owner first: chown clears setuid/setgid bits that chmod then restores.
fn copy_attributes(file: &File, like: &fs::Metadata) -> io::Result<()> {
    if is_root() {
        std::os::unix::fs::fchown(file, Some(like.uid()), Some(like.gid()))?;
    }
    file.set_permissions(Permissions::from_mode(like.mode() & 0o7777))
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUIDE_FILE: &str = "\
# CovetPy production settings
# Managed by ops; see UPGRADE_GUIDE.md

export APP_ENV=production
DATABASE_URI=\"postgresql://covet_app:s3cret@db/covet_production\"
SECRET_KEY='abc def'

  # pool
DB_POOL_SIZE = 10
";

    fn rename_uri() -> Vec<EnvEdit> {
        vec![EnvEdit::Rename {
            from: "DATABASE_URI".into(),
            to: "DATABASE_URL".into(),
        }]
    }

    fn env_file(text: &str) -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("production.env");
        fs::write(&path, text).unwrap();
        fs::set_permissions(&path, Permissions::from_mode(0o640)).unwrap();
        let keep = dir.path().join("production.env.before-op1");
        (dir, path, keep)
    }

    #[test]
    fn guide_rename_changes_only_the_key() {
        let (_dir, path, keep) = env_file(GUIDE_FILE);
        let diff = apply(&path, &rename_uri(), &keep).unwrap();
        assert_eq!(
            diff,
            ["- DATABASE_URI=<redacted>", "+ DATABASE_URL=<redacted>"]
        );
        let expected = GUIDE_FILE.replace("DATABASE_URI=", "DATABASE_URL=");
        assert_eq!(fs::read_to_string(&path).unwrap(), expected);
        assert_eq!(fs::read_to_string(&keep).unwrap(), GUIDE_FILE);
        let mode = |p: &Path| fs::metadata(p).unwrap().mode() & 0o7777;
        assert_eq!(mode(&path), 0o640);
        assert_eq!(mode(&keep), 0o640);
    }

    #[test]
    fn set_replaces_in_place_or_appends_and_unset_removes() {
        let (_dir, path, keep) = env_file(GUIDE_FILE);
        let edits = vec![
            EnvEdit::Set {
                key: "APP_ENV".into(),
                value: "staging".into(),
            },
            EnvEdit::Set {
                key: "DB_POOL_SIZE".into(),
                value: "20".into(),
            },
            EnvEdit::Set {
                key: "GREETING".into(),
                value: "it's $HOME".into(),
            },
            EnvEdit::Set {
                key: "EMPTY".into(),
                value: String::new(),
            },
            EnvEdit::Unset {
                key: "SECRET_KEY".into(),
            },
        ];
        let diff = apply(&path, &edits, &keep).unwrap();
        assert_eq!(
            diff,
            [
                "- APP_ENV=<redacted>",
                "+ APP_ENV=<redacted>",
                "- DB_POOL_SIZE=<redacted>",
                "+ DB_POOL_SIZE=<redacted>",
                "+ GREETING=<redacted>",
                "+ EMPTY=<redacted>",
                "- SECRET_KEY=<redacted>",
            ]
        );
        let expected = "\
# CovetPy production settings
# Managed by ops; see UPGRADE_GUIDE.md

export APP_ENV=staging
DATABASE_URI=\"postgresql://covet_app:s3cret@db/covet_production\"

  # pool
DB_POOL_SIZE=20
GREETING=\"it's \\$HOME\"
EMPTY=''
";
        assert_eq!(fs::read_to_string(&path).unwrap(), expected);
    }

    #[test]
    fn append_to_a_file_without_final_newline() {
        let (_dir, path, keep) = env_file("A=1");
        let set_b = [EnvEdit::Set {
            key: "B".into(),
            value: "two words".into(),
        }];
        apply(&path, &set_b, &keep).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "A=1\nB='two words'\n");
    }

    #[test]
    fn reapplying_is_a_no_op_and_keeps_the_true_original() {
        let (_dir, path, keep) = env_file(GUIDE_FILE);
        let edits = [
            rename_uri(),
            vec![
                EnvEdit::Set {
                    key: "NEW".into(),
                    value: "1".into(),
                },
                EnvEdit::Unset {
                    key: "SECRET_KEY".into(),
                },
            ],
        ]
        .concat();
        apply(&path, &edits, &keep).unwrap();
        let after_first = fs::read_to_string(&path).unwrap();
        assert!(apply(&path, &edits, &keep).unwrap().is_empty());
        assert_eq!(fs::read_to_string(&path).unwrap(), after_first);
        assert_eq!(fs::read_to_string(&keep).unwrap(), GUIDE_FILE);
    }

    #[test]
    fn rename_with_both_names_absent_is_missing_key() {
        let (_dir, path, keep) = env_file("A=1\n");
        let err = apply(&path, &rename_uri(), &keep).unwrap_err();
        assert!(
            matches!(&err, EnvError::MissingKey { key, .. } if key == "DATABASE_URI"),
            "{err}"
        );
        assert_eq!(fs::read_to_string(&path).unwrap(), "A=1\n");
        assert!(!keep.exists());
    }

    #[test]
    fn rename_with_both_names_present_is_a_conflict() {
        let text = "DATABASE_URI=a\nDATABASE_URL=b\n";
        let (_dir, path, keep) = env_file(text);
        let err = apply(&path, &rename_uri(), &keep).unwrap_err();
        assert!(matches!(err, EnvError::Conflict { .. }), "{err}");
        assert_eq!(fs::read_to_string(&path).unwrap(), text);
    }

    #[test]
    fn keep_is_not_overwritten_on_retry() {
        let (_dir, path, keep) = env_file(GUIDE_FILE);
        apply(&path, &rename_uri(), &keep).unwrap();
        // A retry that sees the already edited file must not save it as "original".
        let set = [EnvEdit::Set {
            key: "X".into(),
            value: "1".into(),
        }];
        apply(&path, &set, &keep).unwrap();
        assert_eq!(fs::read_to_string(&keep).unwrap(), GUIDE_FILE);
    }

    #[test]
    fn restore_is_byte_exact_keeps_mode_and_is_idempotent() {
        let (_dir, path, keep) = env_file(GUIDE_FILE);
        fs::set_permissions(&path, Permissions::from_mode(0o600)).unwrap();
        apply(&path, &rename_uri(), &keep).unwrap();
        restore(&path, &keep).unwrap();
        restore(&path, &keep).unwrap();
        assert_eq!(fs::read(&path).unwrap(), GUIDE_FILE.as_bytes());
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o7777, 0o600);
        let leftovers: Vec<_> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_string_lossy().contains("covet-tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn restore_without_a_saved_original_says_so() {
        let (_dir, path, keep) = env_file("A=1\n");
        let err = restore(&path, &keep).unwrap_err();
        assert!(matches!(err, EnvError::NoOriginal { .. }), "{err}");
    }

    #[test]
    fn invalid_keys_and_values_are_refused() {
        for key in ["", "1ABC", "A-B", "A B", "A=B", "Ä", &"K".repeat(129)] {
            let edit = EnvEdit::Unset { key: key.into() };
            assert!(
                matches!(validate(&[edit]), Err(EnvError::InvalidKey(_))),
                "{key:?}"
            );
        }
        for value in ["a\nB=c", "a\rb", "a\0b", &"v".repeat(4097)] {
            let edit = EnvEdit::Set {
                key: "K".into(),
                value: value.into(),
            };
            assert!(
                matches!(validate(&[edit]), Err(EnvError::InvalidValue { .. })),
                "{value:?}"
            );
        }
        let same = EnvEdit::Rename {
            from: "A".into(),
            to: "A".into(),
        };
        assert!(matches!(
            validate(&[same]),
            Err(EnvError::RenameToItself(_))
        ));
        let (_dir, path, keep) = env_file("A=1\n");
        let bad = [EnvEdit::Set {
            key: "A".into(),
            value: "x\ny".into(),
        }];
        assert!(apply(&path, &bad, &keep).is_err());
        assert_eq!(fs::read_to_string(&path).unwrap(), "A=1\n");
    }

    #[test]
    fn plan_matches_apply_and_writes_nothing() {
        let (dir, path, keep) = env_file(GUIDE_FILE);
        let edits = [
            rename_uri(),
            vec![EnvEdit::Set {
                key: "APP_ENV".into(),
                value: "x".into(),
            }],
        ]
        .concat();
        let planned = plan(&path, &edits).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), GUIDE_FILE);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        assert_eq!(apply(&path, &edits, &keep).unwrap(), planned);
    }

    #[test]
    fn parses_assignments_but_not_comments_or_junk() {
        assert_eq!(key_of("export  A_1=x"), Some("A_1"));
        assert_eq!(key_of("\tB =x"), Some("B"));
        assert_eq!(key_of("export=1"), Some("export"));
        assert_eq!(key_of("#A=1"), None);
        assert_eq!(key_of("A"), None);
        assert_eq!(key_of("1A=1"), None);
        assert_eq!(key_of(""), None);
    }
}
