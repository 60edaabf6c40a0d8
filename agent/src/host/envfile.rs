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

/// Names that change how programs find and load code (the dynamic linker,
/// interpreters, shells, pip, git, OpenSSL engines): never editable through
/// the API, even when `env_keys` declares them, since a hook would then run
/// what the editor chose.
const CODE_LOADING_PREFIXES: &[&str] = &[
    "LD_",
    "DYLD_",
    "PYTHON",
    "PERL",
    "RUBY",
    "NODE_",
    "GCONV_",
    "BASH_FUNC_",
    "MALLOC_",
    "PIP_",
    "GIT_",
    "LUA_",
    "TCL",
];
const CODE_LOADING_NAMES: &[&str] = &[
    "BROWSER",
    "BASH_ENV",
    "ENV",
    "PATH",
    "IFS",
    "HOME",
    "SHELL",
    "SHELLOPTS",
    "BASHOPTS",
    "PS4",
    "PROMPT_COMMAND",
    "EDITOR",
    "VISUAL",
    "PAGER",
    "GLIBC_TUNABLES",
    "LOCPATH",
    "NLSPATH",
    "HOSTALIASES",
    "RESOLV_HOST_CONF",
    "OPENSSL_CONF",
    "OPENSSL_ENGINES",
    "JAVA_TOOL_OPTIONS",
    "_JAVA_OPTIONS",
    "JDK_JAVA_OPTIONS",
    "VIRTUAL_ENV",
    "TMPDIR",
];

/// Whether setting `key` can make a program run other code.
pub fn loads_code(key: &str) -> bool {
    let upper = key.to_ascii_uppercase();
    CODE_LOADING_NAMES.contains(&upper.as_str())
        || CODE_LOADING_PREFIXES.iter().any(|p| upper.starts_with(p))
}

/// An `env_keys` entry: a name with `*` wildcards.
pub fn validate_key_pattern(pattern: &str) -> Result<(), String> {
    let ok = !pattern.is_empty()
        && pattern.len() <= MAX_KEY_LEN
        && pattern
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '*');
    if !ok {
        return Err(format!(
            "{pattern:?} is not a key pattern: use letters, digits, `_` and `*` wildcards"
        ));
    }
    if !pattern.contains('*') && loads_code(pattern) {
        return Err(format!(
            "{pattern} changes how programs load code and is never editable; remove it"
        ));
    }
    Ok(())
}

/// Whether `key` matches the glob `pattern` (`*` matches any run of characters).
pub fn key_matches(pattern: &str, key: &str) -> bool {
    let (p, k) = (pattern.as_bytes(), key.as_bytes());
    let (mut pi, mut ki) = (0, 0);
    // Where the last `*` was and what it matched up to: classic backtracking, linear enough.
    let mut star: Option<(usize, usize)> = None;
    while ki < k.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ki));
            pi += 1;
        } else if pi < p.len() && p[pi] == k[ki] {
            pi += 1;
            ki += 1;
        } else if let Some((sp, sk)) = star {
            pi = sp + 1;
            ki = sk + 1;
            star = Some((sp, sk + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// A key an edit may not touch, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotEditable {
    pub key: String,
    pub why: &'static str,
}

impl std::fmt::Display for NotEditable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "env key {} may not be edited: {}", self.key, self.why)
    }
}

/// Checks that every key the edits touch (both names of a rename) is
/// declared by the app's `env_keys` and does not load code.
pub fn check_editable(env_keys: &[String], edits: &[EnvEdit]) -> Result<(), NotEditable> {
    for edit in edits {
        let keys: &[&String] = match edit {
            EnvEdit::Set { key, .. } | EnvEdit::Unset { key } => &[key],
            EnvEdit::Rename { from, to } => &[from, to],
        };
        for key in keys {
            let why = if loads_code(key) {
                "it changes how programs load code, so it is never editable through the agent, \
                 whatever env_keys declares; edit the env file on the host"
            } else if !env_keys.iter().any(|p| key_matches(p, key)) {
                "it is not declared in the app's env_keys in the agent config; add it (or a \
                 glob such as PREFIX_*) there"
            } else {
                continue;
            };
            return Err(NotEditable {
                key: (*key).clone(),
                why,
            });
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
        // The kept original is the agent's own copy of secrets: 0600, root's.
        crate::files::private::write_synced(keep, original.as_bytes())
            .map_err(|e| io_error(format!("saving {}", keep.display()), e))?;
    }
    if !diff.is_empty() {
        write_atomically(&path, file.render().as_bytes(), &meta)?;
    }
    Ok(diff)
}

/// Puts the original saved by [`apply`] back atomically, with the mode and
/// owner of the live env file (the kept copy is the agent's private 0600
/// file), or of the kept copy when the live one is gone. Safe to run more
/// than once.
pub fn restore(path: &Path, keep: &Path) -> Result<(), EnvError> {
    let path = resolve(path).unwrap_or_else(|_| path.to_owned());
    let original = match fs::read(keep) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(EnvError::NoOriginal {
                keep: keep.to_owned(),
            });
        }
        Err(source) => return Err(io_error(format!("reading {}", keep.display()), source)),
    };
    let like = match metadata(&path) {
        Ok(live) => live,
        Err(_) => metadata(keep)?,
    };
    write_atomically(&path, &original, &like)
}

/// The variables of an env file's text exactly as systemd 252's
/// `EnvironmentFile=` sets them (checked against the real systemd by
/// `tests/tests/e2e/security_env.rs`): leading whitespace skipped; `#`/`;` start a
/// comment, and a comment ending in `\` swallows the next line; `export ` is
/// not special (that line is invalid and ignored); the key is trimmed; single
/// quotes are literal; in double quotes `\` escapes `"`, `\`, `` ` ``, `$` and
/// a newline, and is kept before anything else; unquoted, `\` escapes any
/// character and a newline continues the value, trailing whitespace is
/// trimmed; quoted and unquoted parts concatenate; lines without `=` or with
/// an invalid name are ignored; the last assignment of a key wins.
pub fn parse_values(text: &str) -> Vec<(String, String)> {
    #[derive(Clone, Copy, PartialEq)]
    enum State {
        PreKey,
        Key,
        PreValue,
        Value,
        ValueEscape,
        SingleQuote,
        DoubleQuote,
        DoubleQuoteEscape,
        Comment,
        CommentEscape,
    }
    let is_newline = |c: char| c == '\n' || c == '\r';
    let is_space = |c: char| matches!(c, ' ' | '\t' | '\n' | '\r');
    let mut out: Vec<(String, String)> = Vec::new();
    let mut push = |key: &str, value: String| {
        if !is_valid_name(key) {
            return;
        }
        match out.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => out.push((key.to_owned(), value)),
        }
    };
    let mut state = State::PreKey;
    let mut key = String::new();
    let mut value = String::new();
    // Byte lengths to cut trailing whitespace back to (None: nothing to cut).
    let mut key_ws: Option<usize> = None;
    let mut value_ws: Option<usize> = None;
    let trimmed = |s: &str, at: Option<usize>| s[..at.unwrap_or(s.len())].to_owned();
    for c in text.chars() {
        match state {
            State::PreKey => {
                if c == '#' || c == ';' {
                    state = State::Comment;
                } else if !is_space(c) {
                    state = State::Key;
                    key.clear();
                    key.push(c);
                    key_ws = None;
                }
            }
            State::Key => {
                if is_newline(c) {
                    state = State::PreKey;
                } else if c == '=' {
                    state = State::PreValue;
                    value.clear();
                    value_ws = None;
                } else {
                    if !is_space(c) {
                        key_ws = None;
                    } else if key_ws.is_none() {
                        key_ws = Some(key.len());
                    }
                    key.push(c);
                }
            }
            State::PreValue => {
                if is_newline(c) {
                    state = State::PreKey;
                    push(&trimmed(&key, key_ws), std::mem::take(&mut value));
                } else if c == '\'' {
                    state = State::SingleQuote;
                } else if c == '"' {
                    state = State::DoubleQuote;
                } else if c == '\\' {
                    state = State::ValueEscape;
                } else if !is_space(c) {
                    state = State::Value;
                    value.push(c);
                }
            }
            State::Value => {
                if is_newline(c) {
                    state = State::PreKey;
                    let v = trimmed(&value, value_ws);
                    push(&trimmed(&key, key_ws), v);
                    value.clear();
                    value_ws = None;
                } else if c == '\\' {
                    state = State::ValueEscape;
                    value_ws = None;
                } else {
                    if !is_space(c) {
                        value_ws = None;
                    } else if value_ws.is_none() {
                        value_ws = Some(value.len());
                    }
                    value.push(c);
                }
            }
            State::ValueEscape => {
                state = State::Value;
                if !is_newline(c) {
                    value.push(c);
                }
            }
            State::SingleQuote => {
                if c == '\'' {
                    state = State::PreValue;
                } else {
                    value.push(c);
                }
            }
            State::DoubleQuote => {
                if c == '"' {
                    state = State::PreValue;
                } else if c == '\\' {
                    state = State::DoubleQuoteEscape;
                } else {
                    value.push(c);
                }
            }
            State::DoubleQuoteEscape => {
                state = State::DoubleQuote;
                if matches!(c, '"' | '\\' | '`' | '$') {
                    value.push(c);
                } else if c != '\n' {
                    value.push('\\');
                    value.push(c);
                }
            }
            State::Comment => {
                if c == '\\' {
                    state = State::CommentEscape;
                } else if is_newline(c) {
                    state = State::PreKey;
                }
            }
            State::CommentEscape => state = State::Comment,
        }
    }
    match state {
        State::Value => {
            let v = trimmed(&value, value_ws);
            push(&trimmed(&key, key_ws), v);
        }
        State::PreValue
        | State::ValueEscape
        | State::SingleQuote
        | State::DoubleQuote
        | State::DoubleQuoteEscape => push(&trimmed(&key, key_ws), value),
        State::PreKey | State::Key | State::Comment | State::CommentEscape => {}
    }
    out
}

/// [`parse_values`] of the file at `path`; the one reader of env files, for
/// hooks, dry runs and checks alike, so they see what the unit sees.
pub fn read_values(path: &Path) -> Result<Vec<(String, String)>, EnvError> {
    Ok(parse_values(&read_text(path)?))
}

/// systemd's rule for names: ASCII letters, digits and `_`, not starting with a digit.
fn is_valid_name(key: &str) -> bool {
    !key.is_empty()
        && !key.starts_with(|c: char| c.is_ascii_digit())
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn validate_key(key: &str) -> Result<(), EnvError> {
    if is_valid_name(key) && key.len() <= MAX_KEY_LEN {
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
    let after_key = rest[key_len..].trim_start_matches([' ', '\t']);
    (is_valid_name(&rest[..key_len]) && after_key.starts_with('=')).then_some(Assignment {
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
    if crate::files::is_root() {
        std::os::unix::fs::fchown(file, Some(like.uid()), Some(like.gid()))?;
    }
    file.set_permissions(Permissions::from_mode(like.mode() & 0o7777))
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
        assert_eq!(mode(&keep), 0o600);
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

    /// The file checked against the real systemd 252 (see tests/tests/e2e/security_env.rs).
    #[test]
    fn values_read_exactly_like_systemd() {
        let text = "A=plain\n  B = spaced value   \nexport C=exp\n\
            D=\"dq \\\" \\\\ \\$ \\` \\n \\a end\"\nE='sq \\n \"x\" \\\\'\n\
            F=un\\ esc\\aped\\\\ # not comment\nG=cont\\\ninued\nH=\"dq cont\\\ninued\"\n\
            # comment \\\nI=swallowed\n; semi\nJ=has=equals\nK='a'b\"c\"\nL= 'x' y\nM\n\
            N=#hash\n1BAD=x\nO-P=y\nQ=last\nQ=again\nT=\nU=x\\ \nR=\"unterminated\nS=inside\n";
        let got = parse_values(text);
        let want: Vec<(String, String)> = [
            ("A", "plain"),
            ("B", "spaced value"),
            ("D", "dq \" \\ $ ` \\n \\a end"),
            ("E", "sq \\n \"x\" \\\\"),
            ("F", "un escaped\\ # not comment"),
            ("G", "continued"),
            ("H", "dq continued"),
            ("J", "has=equals"),
            ("K", "ab\"c\""),
            ("L", "xy"),
            ("N", "#hash"),
            ("Q", "again"),
            ("T", ""),
            ("U", "x "),
            ("R", "unterminated\nS=inside\n"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(got, want);
        assert!(parse_values("").is_empty());
        assert_eq!(parse_values("A=1"), vec![("A".into(), "1".into())]);
    }

    /// Hostile env files: the reader never panics or hangs, returns only
    /// valid names, and every value it returns came from the file's bytes.
    #[test]
    fn fuzz_env_file_reading() {
        use proptest::prelude::*;
        let piece = prop_oneof![
            Just("=".to_owned()),
            Just("\\".to_owned()),
            Just("\\\n".to_owned()),
            Just("\"".to_owned()),
            Just("'".to_owned()),
            Just("\n".to_owned()),
            Just("\r".to_owned()),
            Just("#".to_owned()),
            Just(";".to_owned()),
            Just(" ".to_owned()),
            Just("export ".to_owned()),
            "[A-Za-z_][A-Za-z0-9_]{0,6}",
            "\\PC{0,4}",
        ];
        let files = proptest::collection::vec(piece, 0..60).prop_map(|p| p.concat());
        crate::fuzzing::run(2000, files, |text| {
            let values = parse_values(&text);
            for (k, v) in &values {
                prop_assert!(is_valid_name(k), "invalid name {k:?} from {text:?}");
                prop_assert!(text.contains(k.as_str()));
                prop_assert!(v.len() <= text.len());
            }
            let mut names: Vec<&String> = values.iter().map(|(k, _)| k).collect();
            names.dedup();
            prop_assert_eq!(names.len(), values.len());
            Ok(())
        });
    }

    /// Edits keep the file parseable: a value written by `set` reads back unchanged.
    #[test]
    fn fuzz_set_values_read_back() {
        use proptest::prelude::*;
        let value = "[ -~\t]{0,40}";
        crate::fuzzing::run(1000, value, |value| {
            let mut file = EnvFile::parse("# c\nA=1\n");
            file.set("K", &value, &mut Vec::new());
            let values = parse_values(&file.render());
            prop_assert_eq!(
                values,
                vec![
                    ("A".to_owned(), "1".to_owned()),
                    ("K".to_owned(), value.clone())
                ]
            );
            Ok(())
        });
    }

    #[test]
    fn only_declared_keys_that_load_no_code_are_editable() {
        let keys = vec!["DATABASE_*".to_owned(), "SECRET".to_owned()];
        let set = |k: &str| EnvEdit::Set {
            key: k.into(),
            value: "v".into(),
        };
        assert!(check_editable(&keys, &[set("DATABASE_URL"), set("SECRET")]).is_ok());
        for bad in [
            "PYTHONWARNINGS",
            "LD_PRELOAD",
            "BROWSER",
            "OTHER",
            "SECRETS",
            "PATH",
        ] {
            assert_eq!(check_editable(&keys, &[set(bad)]).unwrap_err().key, bad);
        }
        let all = vec!["*".to_owned()];
        assert!(check_editable(&all, &[set("ANYTHING")]).is_ok());
        assert_eq!(
            check_editable(&all, &[set("LD_PRELOAD")]).unwrap_err().key,
            "LD_PRELOAD"
        );
        let rename = EnvEdit::Rename {
            from: "DATABASE_URI".into(),
            to: "PYTHONPATH".into(),
        };
        assert_eq!(
            check_editable(&keys, &[rename]).unwrap_err().key,
            "PYTHONPATH"
        );
        let unset = EnvEdit::Unset {
            key: "LD_AUDIT".into(),
        };
        assert_eq!(check_editable(&all, &[unset]).unwrap_err().key, "LD_AUDIT");
        assert!(check_editable(&[], &[set("DATABASE_URL")]).is_err());
        assert!(check_editable(&[], &[]).is_ok());
    }

    #[test]
    fn globs_match_like_shells() {
        assert!(key_matches("DATABASE_*", "DATABASE_URL"));
        assert!(key_matches("DATABASE_*", "DATABASE_"));
        assert!(!key_matches("DATABASE_*", "DATABASE"));
        assert!(key_matches("*_URL", "DATABASE_URL"));
        assert!(key_matches("A*B*C", "AxxBxxC"));
        assert!(!key_matches("A*B*C", "AxxBxxD"));
        assert!(key_matches("ABC", "ABC"));
        assert!(!key_matches("ABC", "ABCD"));
        assert!(validate_key_pattern("DATABASE_*").is_ok());
        assert!(validate_key_pattern("LD_PRELOAD").is_err());
        assert!(validate_key_pattern("A-B").is_err());
        assert!(validate_key_pattern("").is_err());
    }

    #[test]
    fn fuzz_key_globs_agree_with_a_regex() {
        use proptest::prelude::*;
        crate::fuzzing::run(2000, ("[AB*]{0,6}", "[AB]{0,8}"), |(pattern, key)| {
            let regex = format!("^{}$", pattern.replace('*', ".*"));
            let want = regex_lite_match(&regex, &key);
            prop_assert_eq!(key_matches(&pattern, &key), want);
            Ok(())
        });
    }

    /// A tiny reference: `^...$` with `.*` only, by exhaustive recursion.
    fn regex_lite_match(regex: &str, key: &str) -> bool {
        fn go(p: &[u8], k: &[u8]) -> bool {
            match p {
                [] => k.is_empty(),
                [b'.', b'*', rest @ ..] => (0..=k.len()).any(|i| go(rest, &k[i..])),
                [c, rest @ ..] => k.first() == Some(c) && go(rest, &k[1..]),
            }
        }
        let inner = &regex.as_bytes()[1..regex.len() - 1];
        go(inner, key.as_bytes())
    }
}
