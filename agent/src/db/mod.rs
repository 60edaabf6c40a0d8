//! An app's database, one module per kind behind the [`Kind`] trait:
//! a consistent dump through multi-threaded zstd with exact row counts,
//! a verification of the dump, a restore that is checked beside the live
//! data before one swap puts it in place, and the previous data kept until
//! it is dropped.
//!
//! - [`postgres`]: `pg_dump`/`pg_restore` into a side database, renamed in
//!   one transaction; the previous database kept as `{dbname}_before_{id}`.
//! - [`sqlite`]: SQLite's online backup API; the restore is written beside
//!   the live file and renamed over it; the previous file kept as
//!   `{file}.before-{id}`.
//!
//! - [`mysql`]: `mariadb-dump --single-transaction` into a side schema,
//!   every table moved by one `RENAME TABLE`; the previous tables kept in
//!   `{dbname}_before_{id}`.
//!
//! A new kind is one file implementing [`Kind`], one
//! [`crate::config::DatabaseConfig`] variant and one [`Database`] variant;
//! the compiler then points at the arms to add (`with_kind!`).

pub mod mysql;
pub mod postgres;
pub mod sqlite;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use crate::config::DatabaseConfig;

pub use mysql::{ClientPrograms, MysqlTarget};
pub use postgres::{
    PgTarget, drop_kept, dump, list_dump, restore_swap, restore_swap_checked, row_counts,
    server_version,
};
pub use sqlite::SqliteTarget;

const ZSTD_LEVEL: i32 = 3;
/// Size of the chunks handed between the async side and the (de)compressor.
const CHUNK: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error(
        "no PostgreSQL client programs (pg_dump, pg_restore, psql): neither `pg_config --bindir` \
         nor /usr/lib/postgresql/*/bin has them (install the Debian package postgresql-client)"
    )]
    NoClientPrograms,
    #[error(
        "no MySQL/MariaDB client programs (mariadb-dump and mariadb, or mysqldump and mysql) on \
         PATH or in /usr/bin (install the Debian package mariadb-client)"
    )]
    NoMysqlClientPrograms,
    #[error(
        "defaults_file {} of the database config is readable by other users: it holds a \
         password; chmod 600 it",
        .0.display()
    )]
    NotPrivate(PathBuf),
    #[error(
        "the database account cannot dump {db}: {detail} (it needs SELECT, SHOW VIEW, TRIGGER, \
         EVENT on it, and SELECT on mysql.proc for routines another account defined)"
    )]
    MysqlPrivileges { db: String, detail: String },
    #[error("client program directory {} is not an absolute path", .0.display())]
    RelativeBindir(PathBuf),
    #[error("invalid {what} {name:?}: {reason}")]
    InvalidName {
        what: &'static str,
        name: String,
        reason: String,
    },
    #[error("system user {0:?} (os_user of the database config) does not exist")]
    UnknownOsUser(String),
    #[error("could not start {} as {user}: {source}", program.display())]
    Spawn {
        program: PathBuf,
        user: String,
        source: io::Error,
    },
    #[error("{program} failed ({status}): {stderr}")]
    Tool {
        program: String,
        status: ExitStatus,
        stderr: String,
    },
    #[error("{program} did not finish within {}: it was killed", humantime::format_duration(*after))]
    Timeout { program: String, after: Duration },
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
    #[error("dump {} is damaged or truncated: {source}", path.display())]
    CorruptDump { path: PathBuf, source: io::Error },
    #[error("unexpected output from {program}: {detail}")]
    UnexpectedOutput { program: String, detail: String },
    #[error("database {0:?} does not exist")]
    NoSuchDatabase(String),
    #[error(
        "database {0:?} already exists: drop it (if it is a kept copy that is no longer needed) \
         or use another restore id"
    )]
    AlreadyExists(String),
    #[error(
        "restored table {table} has {got} rows but the backup recorded {expected}: \
         the dump does not match its manifest"
    )]
    CountMismatch {
        table: String,
        expected: u64,
        got: u64,
    },
    #[error(
        "table {table} (with {expected} rows in the backup) is missing from the restored database"
    )]
    MissingTable { table: String, expected: u64 },
    #[error("canceled")]
    Canceled,
    #[error(
        "{source}; moreover the partial database {leftover:?} could not be dropped ({cleanup}): \
         drop it by hand"
    )]
    Leftover {
        source: Box<DbError>,
        leftover: String,
        cleanup: Box<DbError>,
    },
    #[error(
        "SQLite database {} (path of the database config) does not exist: create it (run the \
         app's migrations) or fix the path",
        .0.display()
    )]
    NoSuchFile(PathBuf),
    #[error("{} (path of the database config) is not a SQLite database: {why}", path.display())]
    NotSqlite { path: PathBuf, why: String },
    #[error("SQLite {context} {}: {source}", path.display())]
    Sqlite {
        context: &'static str,
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("SQLite integrity_check of {} failed: {report}", path.display())]
    Integrity { path: PathBuf, report: String },
    #[error(
        "not enough space in {} for a copy of the database: {needed} bytes needed, {available} \
         available; free some space and retry",
        dir.display()
    )]
    NoSpace {
        dir: PathBuf,
        needed: u64,
        available: u64,
    },
}

impl DbError {
    fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> DbError {
        let context = context.into();
        move |source| DbError::Io { context, source }
    }
}

/// What a dump wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DumpStats {
    /// Bytes the kind's dump produced (uncompressed).
    pub uncompressed_bytes: u64,
    /// Size of the zstd file.
    pub compressed_bytes: u64,
    /// The dump program's stderr (warnings, if any) although it succeeded.
    pub stderr: String,
}

/// A dump and the exact row counts of the data it holds.
#[derive(Debug, Clone)]
pub struct Dumped {
    pub stats: DumpStats,
    /// "schema.table" -> rows.
    pub row_counts: BTreeMap<String, u64>,
}

/// What a restore left behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreOutcome {
    /// Where the previously live data is now (`{dbname}_before_{id}`, or
    /// the kept file's path).
    pub kept_as: String,
    /// Database properties that could not be carried to the restored
    /// database (each with the server's reason); they stay on `kept_as`.
    pub not_carried: Vec<String>,
}

impl RestoreOutcome {
    /// One line for an operation's step: where the old database is, and
    /// what could not be carried over.
    pub fn describe(&self) -> String {
        let mut text = format!("previous database kept as {}", self.kept_as);
        if !self.not_carried.is_empty() {
            text.push_str(&format!(
                "; not carried over (still on {}): {}",
                self.kept_as,
                self.not_carried.join("; ")
            ));
        }
        text
    }
}

/// What every database kind does; see the module documentation.
// Dispatched statically (`with_kind!`), so the futures' Send-ness is known.
#[allow(async_fn_in_trait)]
pub trait Kind {
    /// The manifest's `format` of this kind's dumps.
    const FORMAT: &'static str;
    /// The database's name for the manifest and messages.
    fn name(&self) -> String;
    /// One line for the backup step: what the dump does.
    fn dump_description(&self) -> String;
    async fn server_version(&self, timeout: Duration) -> Result<String, DbError>;
    /// The dump at `dest` (created, never overwritten) with the row counts
    /// of exactly what it holds.
    async fn dump(
        &self,
        dest: &Path,
        timeout: Duration,
        on_bytes: &(dyn Fn(u64) + Send + Sync),
        cancel: &AtomicBool,
    ) -> Result<Dumped, DbError>;
    /// Restores `dump` as the live database, keeping the previous data
    /// (see each kind); the live data is untouched unless the restored copy
    /// was complete and matched `expected`. Run again with the same id
    /// after a crash, it finishes or does nothing.
    async fn restore_swap_checked(
        &self,
        dump: &Path,
        restore_id: &str,
        expected: &BTreeMap<String, u64>,
        timeout: Duration,
    ) -> Result<RestoreOutcome, DbError>;
    /// Verifies the dump fully, then [`Kind::restore_swap_checked`].
    async fn restore_swap(
        &self,
        dump: &Path,
        restore_id: &str,
        expected: &BTreeMap<String, u64>,
        timeout: Duration,
    ) -> Result<RestoreOutcome, DbError>;
    /// Drops what a restore kept (`RestoreOutcome::kept_as`).
    async fn drop_kept(&self, kept: &str, timeout: Duration) -> Result<(), DbError>;
}

/// An app's database, of one of the kinds.
#[derive(Debug, Clone)]
pub enum Database {
    Postgres(PgTarget),
    Sqlite(SqliteTarget),
    Mysql(MysqlTarget),
}

/// Runs `$body` with `$t` bound to the kind's target.
macro_rules! with_kind {
    ($db:expr, $t:ident => $body:expr) => {
        match $db {
            Database::Postgres($t) => $body,
            Database::Sqlite($t) => $body,
            Database::Mysql($t) => $body,
        }
    };
}

impl Database {
    /// The database the config declares. For PostgreSQL this looks for the
    /// client programs (blocks for at most 10 s).
    pub fn from_config(config: &DatabaseConfig) -> Result<Database, DbError> {
        Ok(match config {
            DatabaseConfig::Postgres(d) => Database::Postgres(PgTarget {
                dbname: d.dbname.clone(),
                host: d.host.clone(),
                port: d.port,
                user: d.user.clone(),
                os_user: d.os_user.clone(),
                bindir: PgTarget::discover_bindir()?,
            }),
            DatabaseConfig::Sqlite(d) => Database::Sqlite(SqliteTarget {
                path: d.path.clone(),
            }),
            DatabaseConfig::Mysql(d) => Database::Mysql(MysqlTarget {
                dbname: d.dbname.clone(),
                socket: d.socket.clone(),
                host: d.host.clone(),
                port: d.port,
                user: d.user.clone(),
                defaults_file: d.defaults_file.clone(),
                os_user: d.os_user.clone(),
                programs: ClientPrograms::discover()?,
            }),
        })
    }

    pub fn format(&self) -> &'static str {
        match self {
            Database::Postgres(_) => PgTarget::FORMAT,
            Database::Sqlite(_) => SqliteTarget::FORMAT,
            Database::Mysql(_) => MysqlTarget::FORMAT,
        }
    }

    pub fn name(&self) -> String {
        with_kind!(self, t => t.name())
    }

    pub fn dump_description(&self) -> String {
        with_kind!(self, t => t.dump_description())
    }

    /// Checks made before a backup or an upgrade is accepted, that a kind
    /// can make without changing anything (MySQL: the server answers and
    /// the account can dump the database).
    pub async fn preflight(&self, timeout: Duration) -> Result<(), DbError> {
        match self {
            Database::Mysql(t) => t.check(timeout).await.map(drop),
            Database::Postgres(_) | Database::Sqlite(_) => Ok(()),
        }
    }

    pub async fn server_version(&self, timeout: Duration) -> Result<String, DbError> {
        with_kind!(self, t => t.server_version(timeout).await)
    }

    pub async fn dump(
        &self,
        dest: &Path,
        timeout: Duration,
        on_bytes: &(dyn Fn(u64) + Send + Sync),
        cancel: &AtomicBool,
    ) -> Result<Dumped, DbError> {
        with_kind!(self, t => Kind::dump(t, dest, timeout, on_bytes, cancel).await)
    }

    pub async fn restore_swap(
        &self,
        dump: &Path,
        restore_id: &str,
        expected: &BTreeMap<String, u64>,
        timeout: Duration,
    ) -> Result<RestoreOutcome, DbError> {
        with_kind!(self, t => Kind::restore_swap(t, dump, restore_id, expected, timeout).await)
    }

    pub async fn restore_swap_checked(
        &self,
        dump: &Path,
        restore_id: &str,
        expected: &BTreeMap<String, u64>,
        timeout: Duration,
    ) -> Result<RestoreOutcome, DbError> {
        with_kind!(self, t => Kind::restore_swap_checked(t, dump, restore_id, expected, timeout).await)
    }

    pub async fn drop_kept(&self, kept: &str, timeout: Duration) -> Result<(), DbError> {
        with_kind!(self, t => Kind::drop_kept(t, kept, timeout).await)
    }
}

/// A zstd writer: level 3 on all cores, with a content checksum (so that
/// damage is detected when the dump is read back).
fn zstd_writer(file: File) -> io::Result<zstd::Encoder<'static, File>> {
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut encoder = zstd::Encoder::new(file, ZSTD_LEVEL)?;
    encoder.include_checksum(true)?;
    encoder.multithread(u32::try_from(workers).unwrap_or(1))?;
    Ok(encoder)
}

/// Ends the zstd stream and fsyncs; the compressed size.
fn finish_zstd(encoder: zstd::Encoder<'static, File>) -> io::Result<u64> {
    let file = encoder.finish()?;
    file.sync_all()?;
    Ok(file.metadata()?.len())
}

/// Makes the new directory entry durable too.
fn sync_parent(path: &Path) -> Result<(), DbError> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    crate::files::fsync_dir(parent)
        .map_err(DbError::io(format!("fsync directory {}", parent.display())))
}

/// Creates `path` for the agent alone (mode 0600), never over an existing
/// file: a dump, a copy or a restore written by a kind. `context` starts the
/// error message ("create dump file"), the path ends it.
fn create_private(path: &Path, context: &str) -> Result<File, DbError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(DbError::io(format!("{context} {}", path.display())))
}

/// A name as an SQL identifier (both kinds follow the standard): in double
/// quotes, inner quotes doubled.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The three names of one restore into a side database or schema:
/// `live`, `{live}_restore_{id}` (being filled), `{live}_before_{id}` (the
/// previous data, kept).
struct SwapNames {
    live: String,
    fresh: String,
    kept: String,
}

impl SwapNames {
    /// The names for `dbname` and `restore_id`, each checked by `check`
    /// (the kind's identifier rule).
    fn new(
        dbname: &str,
        restore_id: &str,
        check: fn(&'static str, &str) -> Result<(), DbError>,
    ) -> Result<SwapNames, DbError> {
        check("database name", dbname)?;
        check("restore id", restore_id)?;
        let names = SwapNames {
            live: dbname.to_owned(),
            fresh: format!("{dbname}_restore_{restore_id}"),
            kept: format!("{dbname}_before_{restore_id}"),
        };
        check("restore database name", &names.fresh)?;
        check("kept database name", &names.kept)?;
        Ok(names)
    }

    /// Checks that `kept` is a kept name of `dbname` (`{dbname}_before_{id}`).
    fn check_kept(
        dbname: &str,
        kept: &str,
        check: fn(&'static str, &str) -> Result<(), DbError>,
    ) -> Result<(), DbError> {
        check("database name", dbname)?;
        let id = kept
            .strip_prefix(dbname)
            .and_then(|rest| rest.strip_prefix("_before_"))
            .ok_or_else(|| DbError::InvalidName {
                what: "kept database",
                name: kept.to_owned(),
                reason: format!("not of the form {dbname}_before_<restore id>"),
            })?;
        check("restore id", id)?;
        check("kept database", kept)
    }
}

/// Only `[A-Za-z0-9_]`, 1 to `max` bytes (`limit` says whose limit that
/// is): such names need no thought in SQL, on command lines or in log
/// lines.
fn plain_name(what: &'static str, name: &str, max: usize, limit: &str) -> Result<(), DbError> {
    let reason = if name.is_empty() {
        "empty".to_owned()
    } else if name.len() > max {
        format!("{} bytes long, {limit} {max}", name.len())
    } else if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_'))
    {
        format!("{c:?} is not allowed (only letters, digits and _)")
    } else {
        return Ok(());
    };
    Err(DbError::InvalidName {
        what,
        name: name.to_owned(),
        reason,
    })
}

/// Fills `buf` unless the reader ends first; the count read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Every table in `expected` must have exactly its count in `got`.
fn check_counts(
    expected: &BTreeMap<String, u64>,
    got: &BTreeMap<String, u64>,
) -> Result<(), DbError> {
    for (table, &want) in expected {
        match got.get(table) {
            None => {
                return Err(DbError::MissingTable {
                    table: table.clone(),
                    expected: want,
                });
            }
            Some(&n) if n != want => {
                return Err(DbError::CountMismatch {
                    table: table.clone(),
                    expected: want,
                    got: n,
                });
            }
            Some(_) => {}
        }
    }
    Ok(())
}
