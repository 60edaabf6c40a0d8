//! Backups and restores of an app's MySQL/MariaDB database with the stock
//! client programs (`mariadb-dump` and `mariadb`, else `mysqldump` and
//! `mysql`), run with an explicit argv, each under a timeout.
//!
//! # Connection
//!
//! The client programs read the credentials from the `defaults_file` of the
//! config (`--defaults-extra-file`, a `[client]` section with `user`,
//! `password`, `socket`...): a password is never on a command line nor in the
//! agent's config. A defaults file readable by other users is refused. The
//! programs run as `os_user` when it is set (then, without `defaults_file`,
//! that user's `~/.my.cnf` or unix-socket authentication applies).
//!
//! One account does everything: it needs every privilege on the database and
//! on the restore's side schemas `{dbname}_restore_*` and `{dbname}_before_*`
//! (`GRANT ALL ON ...`), and, to carry routines, views and triggers defined
//! by another account, what recreating them with that `DEFINER` needs
//! (`SET USER` or `SUPER`, and `SELECT` on `mysql.proc` to read routines).
//!
//! # Dumps
//!
//! `mariadb-dump --single-transaction --routines --triggers --events
//! --hex-blob --default-character-set=utf8mb4 --no-tablespaces
//! --skip-add-locks --skip-lock-tables` of the one database (no `CREATE
//! DATABASE`, no `USE`: it restores into any schema), compressed by the
//! agent with multi-threaded zstd. The row counts are counted in the dump
//! itself as it streams by (the `INSERT` tuples of each table), so they are
//! exactly what the dump holds, taken in the dump's own snapshot.
//!
//! `--single-transaction` is one consistent snapshot for transactional
//! (InnoDB) tables only: a non-transactional (MyISAM, Aria) table written
//! during the dump may be dumped mid-change. Its count still matches its
//! dump, since both come from the same stream.
//!
//! # Restores
//!
//! MySQL has no `RENAME DATABASE`. The dump is restored into a new schema
//! `{dbname}_restore_{id}` (same character set and collation as the live
//! one) and its row counts checked. Then, in the order below, each step
//! idempotent and the plan written first into the table
//! `{dbname}_restore_{id}._covet_swap` (so that a restore run again with the
//! same id after a crash finishes the swap or undoes its start):
//!
//! 1. the triggers and views of both schemas are dropped (a table with
//!    triggers cannot move to another schema; a view cannot move at all);
//! 2. one `RENAME TABLE live.t TO kept.t, …, restored.t TO live.t, …`
//!    moves every base table at once (atomic: all or none);
//! 3. the restored triggers, views, routines and events are created in the
//!    live schema (the previous routines and events dropped there); the
//!    previous tables keep their triggers and views, and the previous
//!    routines, in the kept schema `{dbname}_before_{id}`;
//! 4. the emptied restore schema is dropped.
//!
//! What is carried: tables with their data, indexes, foreign keys and
//! `AUTO_INCREMENT` counters; triggers; views; stored procedures and
//! functions; events. Grants on the database (`db.*`) and on its tables and
//! columns are by name, so they apply to the restored objects as they did to
//! the previous ones; the kept schema has none of them. Not carried: the
//! previous events (an event in the kept schema would run on the kept
//! tables), grants on routines of the restored schema, and the server's
//! accounts themselves. Between steps 1 and 3 the live schema has no
//! triggers or views: the app is stopped during a restore.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use tokio::sync::mpsc;

use super::postgres::{
    Program, check_status, compress_inspecting, decompress, into_new_file, pump, run, run_fed,
    take, unexpected,
};
use super::{
    DbError, DumpStats, Dumped, Kind, RestoreOutcome, SwapNames, check_counts, plain_name,
    sync_parent,
};
use crate::host::process::read_capped;

/// MySQL's identifier limit.
const MAX_NAME_LEN: usize = 64;
/// The plan of a swap, in the restore schema.
const PLAN_TABLE: &str = "_covet_swap";
const PIPELINE_DEPTH: usize = 8;
/// Statements of a script sent to the client end with this (trigger and
/// routine bodies hold `;`), as in mariadb-dump's own output.
const DELIMITER: &str = ";;";

/// Where and how to reach an app's MySQL/MariaDB database.
#[derive(Debug, Clone)]
pub struct MysqlTarget {
    pub dbname: String,
    pub socket: Option<PathBuf>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub user: Option<String>,
    pub defaults_file: Option<PathBuf>,
    pub os_user: Option<String>,
    /// The client programs found.
    pub programs: ClientPrograms,
}

/// The dump program and the command-line client, in one directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientPrograms {
    pub bindir: PathBuf,
    pub dump: &'static str,
    pub client: &'static str,
}

impl ClientPrograms {
    /// `mariadb-dump` + `mariadb`, else `mysqldump` + `mysql`, in the first
    /// absolute PATH directory (then /usr/bin) that has them.
    pub fn discover() -> Result<ClientPrograms, DbError> {
        let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect())
            .unwrap_or_default();
        dirs.push(PathBuf::from("/usr/bin"));
        for dir in dirs.into_iter().filter(|d| d.is_absolute()) {
            for (dump, client) in [("mariadb-dump", "mariadb"), ("mysqldump", "mysql")] {
                if dir.join(dump).is_file() && dir.join(client).is_file() {
                    return Ok(ClientPrograms {
                        bindir: dir,
                        dump,
                        client,
                    });
                }
            }
        }
        Err(DbError::NoMysqlClientPrograms)
    }
}

impl MysqlTarget {
    fn program(&self, name: &'static str) -> Result<Program, DbError> {
        let args = self.connection_args();
        Ok(
            Program::at(&self.programs.bindir, self.os_user.as_deref(), name)?
                .with(|c| c.args(args)),
        )
    }

    /// The client with a script on stdin, on `db`: batch output, no column
    /// names, values not escaped (the queries print JSON).
    fn client(&self, db: Option<&str>) -> Result<Program, DbError> {
        Ok(self.program(self.programs.client)?.with(|c| {
            // --skip-force: a restore stops at its first error, whatever an
            // option file says.
            c.args([
                "--skip-force",
                "--batch",
                "--raw",
                "--skip-column-names",
                "--default-character-set=utf8mb4",
            ])
            .args(db.map(|d| format!("--database={d}")))
        }))
    }

    /// `--defaults-extra-file` first (the programs require it there), then
    /// what the config sets.
    fn connection_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = Vec::new();
        if let Some(file) = &self.defaults_file {
            let mut arg = OsString::from("--defaults-extra-file=");
            arg.push(file);
            args.push(arg);
        }
        if let Some(socket) = &self.socket {
            let mut arg = OsString::from("--socket=");
            arg.push(socket);
            args.push(arg);
            args.push("--protocol=socket".into());
        }
        if let Some(host) = &self.host {
            args.push(format!("--host={host}").into());
            args.push("--protocol=tcp".into());
        }
        if let Some(port) = self.port {
            args.push(format!("--port={port}").into());
        }
        if let Some(user) = &self.user {
            args.push(format!("--user={user}").into());
        }
        args
    }

    /// Runs `script` with the client; its stdout.
    async fn sql(
        &self,
        db: Option<&str>,
        script: &str,
        timeout: Duration,
    ) -> Result<String, DbError> {
        let client = self.client(db)?;
        Box::pin(run(client, script.as_bytes(), timeout)).await
    }

    /// Checks that the database can be dumped: the defaults file is private,
    /// the server answers, the database exists and a schema-only trial dump
    /// (routines, triggers, events, views) goes through. The server's
    /// version.
    pub async fn check(&self, timeout: Duration) -> Result<String, DbError> {
        validate_name("database name", &self.dbname)?;
        if let Some(file) = &self.defaults_file {
            check_private(file)?;
        }
        let out = self
            .sql(
                None,
                &format!(
                    "SELECT VERSION(), (SELECT COUNT(*) FROM information_schema.SCHEMATA \
                     WHERE SCHEMA_NAME = '{}');",
                    self.dbname
                ),
                timeout,
            )
            .await?;
        let (version, found) = out
            .trim()
            .split_once('\t')
            .ok_or_else(|| unexpected(self.programs.client, format!("version line {out:?}")))?;
        if found != "1" {
            return Err(DbError::NoSuchDatabase(self.dbname.clone()));
        }
        let trial = self.program(self.programs.dump)?.with(|c| {
            c.args(DUMP_ARGS)
                .args(["--no-data", "--"])
                .arg(&self.dbname)
        });
        match Box::pin(run(trial, b"", timeout)).await {
            Ok(_) => Ok(version.to_owned()),
            Err(DbError::Tool { stderr, .. }) => Err(DbError::MysqlPrivileges {
                db: self.dbname.clone(),
                detail: stderr,
            }),
            Err(e) => Err(e),
        }
    }

    /// Exact row counts of the base tables of schema `db`, by table name.
    async fn row_counts(
        &self,
        db: &str,
        timeout: Duration,
    ) -> Result<BTreeMap<String, u64>, DbError> {
        let mut counts = BTreeMap::new();
        let tables = self.base_tables(db, timeout).await?;
        let tables: Vec<&String> = tables.iter().filter(|t| *t != PLAN_TABLE).collect();
        if tables.is_empty() {
            return Ok(counts);
        }
        let selects: Vec<String> = tables
            .iter()
            .map(|t| {
                format!(
                    "SELECT {} AS n, COUNT(*) AS c FROM {}.{}",
                    hex_text(t),
                    quote_ident(db),
                    quote_ident(t)
                )
            })
            .collect();
        let sql = format!(
            "SELECT JSON_ARRAYAGG(JSON_ARRAY(n, c)) FROM ({}) x;",
            selects.join(" UNION ALL ")
        );
        let out = self.sql(None, &sql, timeout).await?;
        let pairs: Vec<(String, u64)> = serde_json::from_str(out.trim())
            .map_err(|e| unexpected(self.programs.client, format!("row counts: {e}")))?;
        counts.extend(pairs);
        Ok(counts)
    }

    /// Names of the base tables of `db`.
    async fn base_tables(&self, db: &str, timeout: Duration) -> Result<Vec<String>, DbError> {
        self.json_list(
            &format!(
                "SELECT JSON_ARRAYAGG(TABLE_NAME) FROM information_schema.TABLES \
                 WHERE TABLE_SCHEMA = '{db}' AND TABLE_TYPE = 'BASE TABLE';"
            ),
            timeout,
        )
        .await
    }

    /// A one-row, one-column JSON array of strings (NULL: empty).
    async fn json_list(&self, sql: &str, timeout: Duration) -> Result<Vec<String>, DbError> {
        let out = self.sql(None, sql, timeout).await?;
        let out = out.trim();
        if out == "NULL" || out.is_empty() {
            return Ok(Vec::new());
        }
        serde_json::from_str(out)
            .map_err(|e| unexpected(self.programs.client, format!("{sql}: {e}")))
    }

    /// Those of `names` that exist as schemas.
    async fn schemas(&self, names: &[&str], timeout: Duration) -> Result<Vec<String>, DbError> {
        let list = names
            .iter()
            .map(|n| format!("'{n}'"))
            .collect::<Vec<_>>()
            .join(", ");
        self.json_list(
            &format!(
                "SELECT JSON_ARRAYAGG(SCHEMA_NAME) FROM information_schema.SCHEMATA \
                 WHERE SCHEMA_NAME IN ({list});"
            ),
            timeout,
        )
        .await
    }
}

/// The dump's options (see the module documentation), then those that fix
/// its format whatever an option file says (the rows are counted in it,
/// the last line tells it is complete).
const DUMP_ARGS: [&str; 18] = [
    "--single-transaction",
    "--routines",
    "--triggers",
    "--events",
    "--hex-blob",
    "--default-character-set=utf8mb4",
    "--no-tablespaces",
    "--skip-add-locks",
    "--skip-lock-tables",
    "--quote-names",
    "--extended-insert",
    "--skip-complete-insert",
    "--skip-insert-ignore",
    "--skip-replace",
    "--skip-compact",
    "--comments",
    "--skip-no-data",
    "--skip-no-create-info",
];

/// A credentials file must not be readable by others.
fn check_private(file: &Path) -> Result<(), DbError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(file).map_err(DbError::io(format!(
        "read defaults_file {} of the database config",
        file.display()
    )))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(DbError::NotPrivate(file.to_owned()));
    }
    Ok(())
}

impl Kind for MysqlTarget {
    const FORMAT: &'static str = "mysqldump-sql+zstd";

    fn name(&self) -> String {
        self.dbname.clone()
    }

    fn dump_description(&self) -> String {
        format!(
            "{} --single-transaction of {} through zstd",
            self.programs.dump, self.dbname
        )
    }

    async fn server_version(&self, timeout: Duration) -> Result<String, DbError> {
        self.check(timeout).await
    }

    async fn dump(
        &self,
        dest: &Path,
        timeout: Duration,
        on_bytes: &(dyn Fn(u64) + Send + Sync),
        cancel: &AtomicBool,
    ) -> Result<Dumped, DbError> {
        validate_name("database name", &self.dbname)?;
        into_new_file(dest, self.programs.dump, timeout, cancel, |file| {
            dump_into(self, file, dest, on_bytes)
        })
        .await
    }

    async fn restore_swap_checked(
        &self,
        dump: &Path,
        restore_id: &str,
        expected: &BTreeMap<String, u64>,
        timeout: Duration,
    ) -> Result<RestoreOutcome, DbError> {
        restore(self, dump, restore_id, expected, timeout).await
    }

    async fn restore_swap(
        &self,
        dump: &Path,
        restore_id: &str,
        expected: &BTreeMap<String, u64>,
        timeout: Duration,
    ) -> Result<RestoreOutcome, DbError> {
        SwapNames::new(&self.dbname, restore_id, validate_name)?;
        // A whole pass first: a damaged dump is reported before the server
        // is touched.
        verify_dump(dump, expected).await?;
        restore(self, dump, restore_id, expected, timeout).await
    }

    async fn drop_kept(&self, kept: &str, timeout: Duration) -> Result<(), DbError> {
        SwapNames::check_kept(&self.dbname, kept, validate_name)?;
        let sql = format!("DROP DATABASE IF EXISTS {};", quote_ident(kept));
        self.sql(None, &sql, timeout).await.map(drop)
    }
}

// ---------------------------------------------------------------------------
// Names and quoting

/// Only `[A-Za-z0-9_]`, 1 to 64 bytes.
fn validate_name(what: &'static str, name: &str) -> Result<(), DbError> {
    plain_name(what, name, MAX_NAME_LEN, "MySQL allows only")
}

/// An identifier in backquotes, inner backquotes doubled.
fn quote_ident(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

/// Any text as a utf8mb4 string expression, whatever the sql_mode (no
/// quoting rules involved).
fn hex_text(text: &str) -> String {
    if text.is_empty() {
        return "''".to_owned();
    }
    let hex: String = text.bytes().map(|b| format!("{b:02X}")).collect();
    format!("CONVERT(X'{hex}' USING utf8mb4)")
}

// ---------------------------------------------------------------------------
// Counting rows in a dump

/// Counts the rows of each table in mariadb-dump/mysqldump output as it
/// streams by: a `CREATE TABLE` line names a table (0 rows), each tuple of
/// an `INSERT INTO `t` VALUES (...),(...);` is one row of it. Strings are
/// single-quoted with backslash escapes, as the dump programs write them.
#[derive(Debug, Default)]
pub struct RowCounter {
    counts: BTreeMap<String, u64>,
    /// The current line's start, while in statement position.
    line: Vec<u8>,
    /// Past the bytes that matter on this line: skip to its end.
    skipping: bool,
    /// Inside an INSERT's values: the table, and its rows so far.
    table: Option<String>,
    rows: u64,
    depth: u32,
    in_string: bool,
    escaped: bool,
    /// Saw `-- Dump completed`.
    complete: bool,
    /// Between `DELIMITER ;;` and `DELIMITER ;`: trigger, routine and event
    /// bodies, whose `INSERT` lines are not rows of the dump.
    in_bodies: bool,
}

const INSERT: &[u8] = b"INSERT INTO `";
const CREATE: &[u8] = b"CREATE TABLE `";
const COMPLETED: &[u8] = b"-- Dump completed";
const DELIMITER_LINE: &[u8] = b"DELIMITER ";
/// Longest line start looked at (a quoted name of 64 characters, 4 bytes
/// each, doubled quotes included, fits).
const MAX_HEAD: usize = 1024;

impl RowCounter {
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let used = if self.table.is_some() {
                self.values(bytes)
            } else if self.skipping {
                // The rest of a line that does not matter.
                match memchr::memchr(b'\n', bytes) {
                    Some(at) => {
                        self.line_byte(b'\n');
                        at + 1
                    }
                    None => bytes.len(),
                }
            } else {
                self.line_byte(bytes[0]);
                1
            };
            bytes = &bytes[used..];
        }
    }

    /// Reads an INSERT's values (at most to its end); the bytes used. The
    /// bytes that matter are found with memchr: most of a dump is here.
    fn values(&mut self, bytes: &[u8]) -> usize {
        let mut i = 0;
        while i < bytes.len() {
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                    i += 1;
                    continue;
                }
                let Some(k) = memchr::memchr2(b'\'', b'\\', &bytes[i..]) else {
                    return bytes.len();
                };
                i += k;
                if bytes[i] == b'\\' {
                    self.escaped = true;
                } else {
                    self.in_string = false;
                }
                i += 1;
            } else if self.depth == 0 {
                // Between tuples: `(` starts a row, `;` ends the statement.
                let b = bytes[i];
                i += 1;
                match b {
                    b'(' => {
                        self.rows += 1;
                        self.depth = 1;
                    }
                    b';' => {
                        self.end_insert();
                        self.skipping = true; // the rest of the line
                        return i;
                    }
                    b'\'' => self.in_string = true,
                    _ => {}
                }
            } else {
                // Inside a tuple no `;` stands outside a string.
                let Some(k) = memchr::memchr3(b'\'', b'(', b')', &bytes[i..]) else {
                    return bytes.len();
                };
                i += k;
                match bytes[i] {
                    b'\'' => self.in_string = true,
                    b'(' => self.depth += 1,
                    _ => self.depth -= 1,
                }
                i += 1;
            }
        }
        bytes.len()
    }

    /// Adds the rows of the INSERT that ended to its table's count.
    fn end_insert(&mut self) {
        if let Some(table) = self.table.take() {
            *self.counts.entry(table).or_insert(0) += std::mem::take(&mut self.rows);
        }
    }

    fn line_byte(&mut self, b: u8) {
        if b == b'\n' {
            if !self.skipping {
                self.end_of_line();
            }
            self.line.clear();
            self.skipping = false;
            return;
        }
        if self.skipping {
            return;
        }
        self.line.push(b);
        let line = &self.line[..];
        let could_be = |prefix: &[u8]| {
            let n = line.len().min(prefix.len());
            line[..n] == prefix[..n]
        };
        let wanted = [INSERT, CREATE, COMPLETED, DELIMITER_LINE];
        if !wanted.iter().any(|p| could_be(p)) || line.len() > MAX_HEAD {
            self.skipping = true;
            return;
        }
        if !self.in_bodies
            && line.starts_with(INSERT)
            && let Some((name, rest)) = quoted_name(&line[INSERT.len() - 1..])
        {
            const VALUES: &[u8] = b" VALUES";
            if rest.len() >= VALUES.len() {
                if rest.starts_with(VALUES) {
                    self.counts.entry(name.clone()).or_insert(0);
                    self.table = Some(name);
                    self.rows = 0;
                    self.depth = 0;
                    self.in_string = false;
                    self.escaped = false;
                } else {
                    self.skipping = true;
                }
                self.line.clear();
            }
        }
    }

    fn end_of_line(&mut self) {
        let line = &self.line[..];
        if let Some(delimiter) = line.strip_prefix(DELIMITER_LINE) {
            self.in_bodies = delimiter.trim_ascii() != b";";
        } else if self.in_bodies {
            // A body's line.
        } else if line.starts_with(CREATE) {
            if let Some((name, _)) = quoted_name(&line[CREATE.len() - 1..]) {
                self.counts.entry(name).or_insert(0);
            }
        } else if line.starts_with(COMPLETED) {
            self.complete = true;
        }
    }

    /// Rows by table, and whether the dump's closing line was seen.
    pub fn finish(mut self) -> (BTreeMap<String, u64>, bool) {
        self.end_insert();
        (self.counts, self.complete)
    }
}

/// `` `na``me` rest `` → ("na`me", " rest"), once the closing quote is in.
fn quoted_name(bytes: &[u8]) -> Option<(String, &[u8])> {
    let mut name = Vec::new();
    let mut i = 1;
    while i < bytes.len() {
        if bytes[i] == b'`' {
            if bytes.get(i + 1) == Some(&b'`') {
                name.push(b'`');
                i += 2;
                continue;
            }
            if i + 1 == bytes.len() {
                return None; // a doubled quote may follow
            }
            return Some((String::from_utf8_lossy(&name).into_owned(), &bytes[i + 1..]));
        }
        name.push(bytes[i]);
        i += 1;
    }
    None
}

/// Decompresses the whole dump (checking its zstd checksum), counts its rows
/// and checks them against `expected` and that the dump is complete; the
/// number of tables.
pub async fn verify_dump(dump: &Path, expected: &BTreeMap<String, u64>) -> Result<usize, DbError> {
    let file = File::open(dump).map_err(DbError::io(format!("open dump {}", dump.display())))?;
    let path = dump.to_owned();
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(PIPELINE_DEPTH);
    let decompressor = tokio::task::spawn_blocking(move || decompress(file, &path, tx));
    let mut counter = RowCounter::default();
    while let Some(chunk) = rx.recv().await {
        counter.feed(&chunk);
    }
    decompressor
        .await
        .map_err(|e| DbError::io("zstd decompressor")(io::Error::other(e)))??;
    let (counts, complete) = counter.finish();
    if !complete {
        return Err(DbError::CorruptDump {
            path: dump.to_owned(),
            source: io::Error::other("it does not end with `-- Dump completed`"),
        });
    }
    check_counts(expected, &counts)?;
    Ok(counts.len())
}

// ---------------------------------------------------------------------------
// Dump pipeline: mariadb-dump stdout -> channel -> count + zstd on a thread.

async fn dump_into(
    t: &MysqlTarget,
    file: File,
    dest: &Path,
    on_bytes: &(dyn Fn(u64) + Send + Sync),
) -> Result<Dumped, DbError> {
    let program = t.programs.dump;
    let dump = t
        .program(program)?
        .with(|c| c.args(DUMP_ARGS).arg("--").arg(&t.dbname));
    let mut child = dump.spawn()?;
    let (stdout, stderr) = (take(child.stdout.take())?, take(child.stderr.take())?);
    let (tx, rx) = mpsc::channel(PIPELINE_DEPTH);
    let compressor = tokio::task::spawn_blocking(move || {
        let mut counter = RowCounter::default();
        compress_inspecting(file, rx, |chunk| counter.feed(chunk)).map(|n| (n, counter))
    });
    let (pumped, stderr) = tokio::join!(pump(stdout, tx, on_bytes), read_capped(stderr));
    let status = child
        .wait()
        .await
        .map_err(DbError::io(format!("wait for {program}")))?;
    let (compressed_bytes, counter) = compressor
        .await
        .map_err(|e| DbError::io("zstd compressor")(io::Error::other(e)))?
        .map_err(DbError::io(format!("write {}", dest.display())))?;
    check_status(program, status, &stderr)?;
    let uncompressed_bytes = pumped.map_err(DbError::io(format!("read {program} output")))?;
    sync_parent(dest)?;
    let (row_counts, complete) = counter.finish();
    if !complete {
        return Err(unexpected(
            program,
            "the dump does not end with `-- Dump completed`",
        ));
    }
    Ok(Dumped {
        stats: DumpStats {
            uncompressed_bytes,
            compressed_bytes,
            stderr,
        },
        row_counts,
    })
}

// ---------------------------------------------------------------------------
// Restore

/// One statement of a swap's plan.
#[derive(Debug, Clone, serde::Deserialize)]
struct PlanStep {
    /// `undo`: puts the live schema's triggers and views back (before the
    /// rename); `drop`: before the rename; `after`: after it.
    phase: String,
    /// Schema the statement runs in.
    db: String,
    sql_mode: String,
    stmt: String,
}

/// A plan: its steps and the tables the rename moves.
#[derive(Debug, Default)]
struct Plan {
    steps: Vec<PlanStep>,
    live_tables: Vec<String>,
    fresh_tables: Vec<String>,
}

async fn restore(
    t: &MysqlTarget,
    dump: &Path,
    restore_id: &str,
    expected: &BTreeMap<String, u64>,
    timeout: Duration,
) -> Result<RestoreOutcome, DbError> {
    let names = SwapNames::new(&t.dbname, restore_id, validate_name)?;
    let outcome = || RestoreOutcome {
        kept_as: names.kept.clone(),
        not_carried: Vec::new(),
    };
    let found = t
        .schemas(&[&names.live, &names.fresh, &names.kept], timeout)
        .await?;
    let has = |n: &str| found.iter().any(|f| f == n);
    if has(&names.fresh) {
        // An earlier attempt with this id: finish its swap or undo its start.
        if let Some(plan) = read_plan(t, &names, timeout).await? {
            if renamed(t, &names, &plan, timeout).await? {
                run_phase(t, &plan, "after", timeout).await?;
                drop_schema(t, &names.fresh, timeout).await?;
                tracing::info!("{} restore {restore_id}: finished its swap", names.live);
                return Ok(outcome());
            }
            undo(t, &names, &plan, timeout).await?;
        }
        tracing::warn!(
            "dropping {}, left by an earlier restore with the same id",
            names.fresh
        );
        drop_schema(t, &names.fresh, timeout).await?;
    } else if has(&names.kept) {
        tracing::info!(
            "{} was already restored as {} was kept",
            names.live,
            names.kept
        );
        return Ok(outcome());
    }
    if !has(&names.live) {
        return Err(DbError::NoSuchDatabase(names.live.clone()));
    }
    let sql = format!(
        "SELECT CONCAT(DEFAULT_CHARACTER_SET_NAME, '\\t', DEFAULT_COLLATION_NAME) \
         FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = '{}';",
        names.live
    );
    let out = t.sql(None, &sql, timeout).await?;
    let (charset, collation) = out
        .trim()
        .split_once('\t')
        .ok_or_else(|| unexpected(t.programs.client, format!("schema charset {out:?}")))?;
    validate_name("character set", charset)?;
    validate_name("collation", collation)?;
    t.sql(
        None,
        &format!(
            "CREATE DATABASE {} CHARACTER SET {charset} COLLATE {collation};",
            quote_ident(&names.fresh)
        ),
        timeout,
    )
    .await?;
    let restored = async {
        let client = t.client(Some(&names.fresh))?;
        run_fed(client, dump, false, timeout).await?;
        check_counts(expected, &t.row_counts(&names.fresh, timeout).await?)?;
        let plan = make_plan(t, &names, timeout).await?;
        write_plan(t, &names, &plan, timeout).await?;
        Ok::<_, DbError>(plan)
    }
    .await;
    let plan = match restored {
        Ok(plan) => plan,
        Err(error) => return Err(discard(t, &names.fresh, error, timeout).await),
    };
    // From here on a failure leaves the plan for a run with the same id.
    run_phase(t, &plan, "drop", timeout).await?;
    let mut moves: Vec<String> = plan
        .live_tables
        .iter()
        .map(|tb| {
            format!(
                "{}.{} TO {}.{}",
                quote_ident(&names.live),
                quote_ident(tb),
                quote_ident(&names.kept),
                quote_ident(tb)
            )
        })
        .collect();
    moves.extend(plan.fresh_tables.iter().map(|tb| {
        format!(
            "{}.{} TO {}.{}",
            quote_ident(&names.fresh),
            quote_ident(tb),
            quote_ident(&names.live),
            quote_ident(tb)
        )
    }));
    let mut sql = format!(
        "CREATE DATABASE IF NOT EXISTS {} CHARACTER SET {charset} COLLATE {collation};\n",
        quote_ident(&names.kept)
    );
    if !moves.is_empty() {
        sql.push_str(&format!("RENAME TABLE {};\n", moves.join(", ")));
    }
    if let Err(e) = t.sql(None, &sql, timeout).await {
        // Not renamed (it is one statement): the live schema as it was.
        if !renamed(t, &names, &plan, timeout).await.unwrap_or(false) {
            undo(t, &names, &plan, timeout).await?;
            return Err(discard(t, &names.fresh, e, timeout).await);
        }
    }
    run_phase(t, &plan, "after", timeout).await?;
    drop_schema(t, &names.fresh, timeout).await?;
    Ok(outcome())
}

/// Before the rename: the live schema's triggers and views back, and the
/// kept schema gone if this restore created it (it is empty).
async fn undo(
    t: &MysqlTarget,
    names: &SwapNames,
    plan: &Plan,
    timeout: Duration,
) -> Result<(), DbError> {
    run_phase(t, plan, "undo", timeout).await?;
    if t.base_tables(&names.kept, timeout).await?.is_empty() {
        drop_schema(t, &names.kept, timeout).await?;
    }
    Ok(())
}

/// Drops `fresh` after `error`; a failure to do so is reported with it.
async fn discard(t: &MysqlTarget, fresh: &str, error: DbError, timeout: Duration) -> DbError {
    match drop_schema(t, fresh, timeout).await {
        Ok(()) => error,
        Err(cleanup) => DbError::Leftover {
            source: Box::new(error),
            leftover: fresh.to_owned(),
            cleanup: Box::new(cleanup),
        },
    }
}

async fn drop_schema(t: &MysqlTarget, name: &str, timeout: Duration) -> Result<(), DbError> {
    t.sql(
        None,
        &format!("DROP DATABASE IF EXISTS {};", quote_ident(name)),
        timeout,
    )
    .await
    .map(drop)
}

/// Whether the rename happened: the kept schema exists, none of the
/// restored tables is left in the restore schema, and every previous one is
/// in the kept schema.
async fn renamed(
    t: &MysqlTarget,
    names: &SwapNames,
    plan: &Plan,
    timeout: Duration,
) -> Result<bool, DbError> {
    if t.schemas(&[&names.kept], timeout).await?.is_empty() {
        return Ok(false);
    }
    let left = t.base_tables(&names.fresh, timeout).await?;
    let kept = t.base_tables(&names.kept, timeout).await?;
    Ok(plan.fresh_tables.iter().all(|tb| !left.contains(tb))
        && plan.live_tables.iter().all(|tb| kept.contains(tb)))
}

/// Objects of one schema, with their definitions.
#[derive(Debug, Default)]
struct Objects {
    /// (name, sql_mode, CREATE TRIGGER ...)
    triggers: Vec<(String, String, String)>,
    /// (name, CREATE VIEW ...), names qualified with the schema.
    views: Vec<(String, String)>,
    /// (PROCEDURE|FUNCTION, name, sql_mode, CREATE ...)
    routines: Vec<(String, String, String, String)>,
    /// (name, sql_mode, CREATE EVENT ...)
    events: Vec<(String, String, String)>,
}

#[derive(serde::Deserialize)]
struct Named {
    kind: String,
    name: String,
}

/// Reads the objects of `db` with `SHOW CREATE` (one client run for all).
async fn objects(t: &MysqlTarget, db: &str, timeout: Duration) -> Result<Objects, DbError> {
    let listing = format!(
        "SELECT JSON_ARRAYAGG(JSON_OBJECT('kind', k, 'name', n)) FROM (\
           SELECT 'TRIGGER' k, TRIGGER_NAME n FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA = '{db}' \
           UNION ALL SELECT 'VIEW', TABLE_NAME FROM information_schema.VIEWS WHERE TABLE_SCHEMA = '{db}' \
           UNION ALL SELECT ROUTINE_TYPE, ROUTINE_NAME FROM information_schema.ROUTINES WHERE ROUTINE_SCHEMA = '{db}' \
           UNION ALL SELECT 'EVENT', EVENT_NAME FROM information_schema.EVENTS WHERE EVENT_SCHEMA = '{db}') x;"
    );
    let out = t.sql(None, &listing, timeout).await?;
    let out = out.trim();
    let named: Vec<Named> = if out == "NULL" || out.is_empty() {
        Vec::new()
    } else {
        serde_json::from_str(out)
            .map_err(|e| unexpected(t.programs.client, format!("objects of {db}: {e}")))?
    };
    let mut objects = Objects::default();
    for Named { kind, name } in named {
        if !matches!(
            kind.as_str(),
            "TRIGGER" | "VIEW" | "PROCEDURE" | "FUNCTION" | "EVENT"
        ) {
            continue;
        }
        let sql = format!(
            "SHOW CREATE {kind} {}.{};",
            quote_ident(db),
            quote_ident(&name)
        );
        let shown = show_create(t, &sql, timeout).await?;
        let col = |i: usize| shown.get(i).cloned().unwrap_or_default();
        match kind.as_str() {
            // Trigger, sql_mode, SQL Original Statement, ...
            "TRIGGER" => objects.triggers.push((name, col(1), col(2))),
            // View, Create View, ...
            "VIEW" => objects.views.push((name, col(1))),
            // Procedure, sql_mode, Create Procedure, ...
            "PROCEDURE" | "FUNCTION" => objects.routines.push((kind, name, col(1), col(2))),
            // Event, sql_mode, time_zone, Create Event, ...
            _ => objects.events.push((name, col(1), col(3))),
        }
    }
    Ok(objects)
}

/// The columns of a SHOW CREATE's one row (`--xml`: bodies may hold tabs
/// and newlines).
async fn show_create(
    t: &MysqlTarget,
    sql: &str,
    timeout: Duration,
) -> Result<Vec<String>, DbError> {
    let client = t.client(None)?.with(|c| c.arg("--xml"));
    let xml = Box::pin(run(client, sql.as_bytes(), timeout)).await?;
    Ok(parse_xml_row(&xml))
}

/// The field values of the first `<row>` of the client's `--xml` output.
fn parse_xml_row(xml: &str) -> Vec<String> {
    let mut fields = Vec::new();
    let Some(row) = xml.split("<row>").nth(1) else {
        return fields;
    };
    let row = row.split("</row>").next().unwrap_or("");
    for part in row.split("<field ").skip(1) {
        let Some(start) = part.find('>') else {
            continue;
        };
        let head = &part[..start];
        if head.ends_with('/') || head.contains("xsi:nil") {
            fields.push(String::new());
            continue;
        }
        let body = &part[start + 1..];
        let end = body.find("</field>").unwrap_or(body.len());
        fields.push(xml_unescape(&body[..end]));
    }
    fields
}

fn xml_unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('&') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        let Some(end) = rest.find(';') else { break };
        let entity = &rest[1..end];
        let decoded = match entity {
            "lt" => Some('<'),
            "gt" => Some('>'),
            "amp" => Some('&'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            e if e.starts_with("#x") => u32::from_str_radix(&e[2..], 16)
                .ok()
                .and_then(char::from_u32),
            e if e.starts_with('#') => e[1..].parse().ok().and_then(char::from_u32),
            _ => None,
        };
        match decoded {
            Some(c) => {
                out.push(c);
                rest = &rest[end + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// `CREATE ...` → `CREATE ...` with `` `from`. `` qualifiers as `` `to`. ``.
fn requalify(stmt: &str, from: &str, to: &str) -> String {
    stmt.replace(
        &format!("{}.", quote_ident(from)),
        &format!("{}.", quote_ident(to)),
    )
}

/// The swap's statements (see the module documentation).
async fn make_plan(t: &MysqlTarget, names: &SwapNames, timeout: Duration) -> Result<Plan, DbError> {
    let live = objects(t, &names.live, timeout).await?;
    let fresh = objects(t, &names.fresh, timeout).await?;
    let mut plan = Plan {
        live_tables: t.base_tables(&names.live, timeout).await?,
        fresh_tables: t
            .base_tables(&names.fresh, timeout)
            .await?
            .into_iter()
            .filter(|tb| tb != PLAN_TABLE)
            .collect(),
        steps: Vec::new(),
    };
    let (l, f, k) = (&names.live, &names.fresh, &names.kept);
    // Undo: the live schema's own triggers and views again.
    plan.recreate("undo", &live, l, l, Carry::TABLE_BOUND);
    // Before the rename: no triggers or views on either side.
    for (db, objects) in [(l, &live), (f, &fresh)] {
        for (n, _, _) in &objects.triggers {
            plan.step("drop", db, "", drop_stmt("TRIGGER", db, n));
        }
        for (n, _) in &objects.views {
            plan.step("drop", db, "", drop_stmt("VIEW", db, n));
        }
    }
    // After: the previous triggers, views and routines in the kept schema,
    // the previous routines and events out of the live one...
    plan.recreate("after", &live, l, k, Carry::TABLE_BOUND_AND_ROUTINES);
    for (kind, n, _, _) in &live.routines {
        plan.step("after", l, "", drop_stmt(kind, l, n));
    }
    for (n, _, _) in &live.events {
        plan.step("after", l, "", drop_stmt("EVENT", l, n));
    }
    // ... and the restored ones in the live schema.
    plan.recreate("after", &fresh, f, l, Carry::ALL);
    Ok(plan)
}

/// Which objects [`Plan::recreate`] carries.
#[derive(Clone, Copy)]
struct Carry {
    routines: bool,
    events: bool,
}

impl Carry {
    /// Triggers and views: what a table's move to another schema needs.
    const TABLE_BOUND: Carry = Carry {
        routines: false,
        events: false,
    };
    const TABLE_BOUND_AND_ROUTINES: Carry = Carry {
        routines: true,
        events: false,
    };
    const ALL: Carry = Carry {
        routines: true,
        events: true,
    };
}

/// `DROP {kind} IF EXISTS db.name`.
fn drop_stmt(kind: &str, db: &str, name: &str) -> String {
    format!(
        "DROP {kind} IF EXISTS {}.{}",
        quote_ident(db),
        quote_ident(name)
    )
}

impl Plan {
    fn step(&mut self, phase: &str, db: &str, sql_mode: &str, stmt: String) {
        self.steps.push(PlanStep {
            phase: phase.to_owned(),
            db: db.to_owned(),
            sql_mode: sql_mode.to_owned(),
            stmt,
        });
    }

    /// Steps of `phase` that (re)create `objects` of schema `from` in
    /// schema `to`, each after a drop of the same name there (so that a
    /// phase run twice does the same).
    fn recreate(&mut self, phase: &str, objects: &Objects, from: &str, to: &str, carry: Carry) {
        let mut put = |kind: &str, name: &str, mode: &str, stmt: &str| {
            self.step(phase, to, mode, drop_stmt(kind, to, name));
            self.step(phase, to, mode, requalify(stmt, from, to));
        };
        for (n, mode, stmt) in &objects.triggers {
            put("TRIGGER", n, mode, stmt);
        }
        for (n, stmt) in &objects.views {
            put("VIEW", n, "", stmt);
        }
        if carry.routines {
            for (kind, n, mode, stmt) in &objects.routines {
                put(kind, n, mode, stmt);
            }
        }
        if carry.events {
            for (n, mode, stmt) in &objects.events {
                put("EVENT", n, mode, stmt);
            }
        }
    }
}

/// Stores the plan in the restore schema (one statement: all or nothing).
async fn write_plan(
    t: &MysqlTarget,
    names: &SwapNames,
    plan: &Plan,
    timeout: Duration,
) -> Result<(), DbError> {
    let table = format!("{}.{}", quote_ident(&names.fresh), quote_ident(PLAN_TABLE));
    let mut rows: Vec<String> = Vec::new();
    let mut row = |phase: &str, db: &str, mode: &str, stmt: &str| {
        rows.push(format!(
            "({}, {}, {}, {}, {})",
            rows.len(),
            hex_text(phase),
            hex_text(db),
            hex_text(mode),
            hex_text(stmt)
        ));
    };
    for tb in &plan.live_tables {
        row("live_table", "", "", tb);
    }
    for tb in &plan.fresh_tables {
        row("fresh_table", "", "", tb);
    }
    for s in &plan.steps {
        row(&s.phase, &s.db, &s.sql_mode, &s.stmt);
    }
    let mut sql = format!(
        "CREATE TABLE {table} (seq INT PRIMARY KEY, phase VARCHAR(16) NOT NULL, \
         db VARCHAR(64) NOT NULL, sql_mode TEXT NOT NULL, stmt LONGTEXT NOT NULL) \
         ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;\n"
    );
    if !rows.is_empty() {
        sql.push_str(&format!(
            "INSERT INTO {table} VALUES {};\n",
            rows.join(", ")
        ));
    }
    t.sql(None, &sql, timeout).await.map(drop)
}

/// The plan an earlier attempt wrote, if it got that far.
async fn read_plan(
    t: &MysqlTarget,
    names: &SwapNames,
    timeout: Duration,
) -> Result<Option<Plan>, DbError> {
    let tables = t.base_tables(&names.fresh, timeout).await?;
    if !tables.iter().any(|tb| tb == PLAN_TABLE) {
        return Ok(None);
    }
    // One JSON object a line (JSON escapes newlines), in order: MySQL's
    // JSON_ARRAYAGG has no ORDER BY.
    let sql = format!(
        "SELECT JSON_OBJECT('phase', phase, 'db', db, 'sql_mode', sql_mode, 'stmt', stmt) \
         FROM {}.{} ORDER BY seq;",
        quote_ident(&names.fresh),
        quote_ident(PLAN_TABLE)
    );
    let out = t.sql(None, &sql, timeout).await?;
    let rows = out
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str::<PlanStep>(l)
                .map_err(|e| unexpected(t.programs.client, format!("plan: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut plan = Plan::default();
    for r in rows {
        match r.phase.as_str() {
            "live_table" => plan.live_tables.push(r.stmt),
            "fresh_table" => plan.fresh_tables.push(r.stmt),
            _ => plan.steps.push(r),
        }
    }
    Ok(Some(plan))
}

/// Runs the plan's statements of `phase`, in order, in one client run.
async fn run_phase(
    t: &MysqlTarget,
    plan: &Plan,
    phase: &str,
    timeout: Duration,
) -> Result<(), DbError> {
    let script = phase_script(plan, phase);
    if script.is_empty() {
        return Ok(());
    }
    t.sql(None, &script, timeout).await.map(drop)
}

fn phase_script(plan: &Plan, phase: &str) -> String {
    let mut script = String::new();
    for s in plan.steps.iter().filter(|s| s.phase == phase) {
        if script.is_empty() {
            script.push_str(&format!("DELIMITER {DELIMITER}\n"));
        }
        script.push_str(&format!(
            "USE {}{DELIMITER}\nSET SESSION sql_mode = {}{DELIMITER}\n{}\n{DELIMITER}\n",
            quote_ident(&s.db),
            hex_text(&s.sql_mode),
            s.stmt
        ));
    }
    script
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(chunks: &[&[u8]]) -> (BTreeMap<String, u64>, bool) {
        let mut c = RowCounter::default();
        for chunk in chunks {
            c.feed(chunk);
        }
        c.finish()
    }

    const DUMP: &str = "-- MariaDB dump 10.19\n\
CREATE TABLE `e` (\n  `id` int(11)\n);\n\
CREATE TABLE `odd``name` (\n  `x` int\n);\n\
INSERT INTO `odd``name` VALUES (1),(2),(3);\n\
CREATE TABLE `users` (\n  `id` int\n);\n\
INSERT INTO `users` VALUES\n(1,'a(b)\\'c\\\\',0x00FF),\n(2,'x,y;(z',NULL);\n\
INSERT INTO `users` VALUES (3,'it''s)',NULL);\n\
/*!50001 CREATE VIEW `v` AS SELECT\n 1 AS `id` */;\n\
DELIMITER ;;\n\
CREATE DEFINER=`a`@`%` PROCEDURE `p`()\n\
BEGIN\n\
INSERT INTO `users` VALUES (9,'not a row',NULL);\n\
CREATE TABLE `not_a_table` (x int);\n\
END ;;\n\
DELIMITER ;\n\
-- Dump completed on 2026-12-02 15:27:10\n";

    #[test]
    fn rows_are_counted_in_the_dump_whatever_the_chunks() {
        let expected: BTreeMap<String, u64> = [("e", 0), ("odd`name", 3), ("users", 3)]
            .map(|(k, v)| (k.to_owned(), v))
            .into();
        assert_eq!(count(&[DUMP.as_bytes()]), (expected.clone(), true));
        let bytes = DUMP.as_bytes();
        for at in 0..bytes.len() {
            assert_eq!(
                count(&[&bytes[..at], &bytes[at..]]),
                (expected.clone(), true),
                "{at}"
            );
        }
        let cut = &bytes[..bytes.len() - 30];
        assert!(!count(&[cut]).1, "no closing line");
    }

    #[test]
    fn names_and_literals() {
        assert!(validate_name("n", "covet_production").is_ok());
        for bad in ["", "a-b", "a`b", &"x".repeat(65)] {
            assert!(validate_name("n", bad).is_err(), "{bad}");
        }
        assert!(SwapNames::new(&"d".repeat(55), "12345", validate_name).is_err());
        assert_eq!(quote_ident("a`b"), "`a``b`");
        assert_eq!(hex_text("a'"), "CONVERT(X'6127' USING utf8mb4)");
        assert_eq!(hex_text(""), "''");
        assert_eq!(
            requalify(
                "VIEW `s`.`v` AS select `s`.`t`.`a` from `s`.`t` `s`",
                "s",
                "k"
            ),
            "VIEW `k`.`v` AS select `k`.`t`.`a` from `k`.`t` `s`"
        );
    }

    #[test]
    fn xml_rows_are_read_with_entities() {
        let xml = "<?xml version=\"1.0\"?>\n<resultset statement=\"SHOW\">\n  <row>\n\
            <field name=\"Trigger\">tr</field>\n<field name=\"sql_mode\" xsi:nil=\"true\" />\n\
            <field name=\"SQL Original Statement\">CREATE TRIGGER tr BEFORE INSERT ON t\nFOR EACH ROW SET @a = 1 &lt; 2 &amp;&amp; &#x27;x&#39;</field>\n\
          </row>\n</resultset>\n";
        assert_eq!(
            parse_xml_row(xml),
            [
                "tr",
                "",
                "CREATE TRIGGER tr BEFORE INSERT ON t\nFOR EACH ROW SET @a = 1 < 2 && 'x'"
            ]
        );
    }

    #[test]
    fn connection_args_put_the_defaults_file_first_and_never_a_password() {
        let t = MysqlTarget {
            dbname: "shop".into(),
            socket: Some("/run/mysqld/mysqld.sock".into()),
            host: None,
            port: None,
            user: Some("agent".into()),
            defaults_file: Some("/etc/covet/my.cnf".into()),
            os_user: None,
            programs: ClientPrograms {
                bindir: "/usr/bin".into(),
                dump: "mariadb-dump",
                client: "mariadb",
            },
        };
        assert_eq!(
            t.connection_args(),
            [
                "--defaults-extra-file=/etc/covet/my.cnf",
                "--socket=/run/mysqld/mysqld.sock",
                "--protocol=socket",
                "--user=agent"
            ]
        );
    }

    #[test]
    fn phase_scripts_use_the_dump_programs_delimiter() {
        let plan = Plan {
            steps: vec![PlanStep {
                phase: "after".into(),
                db: "shop".into(),
                sql_mode: "".into(),
                stmt: "CREATE TRIGGER t BEFORE INSERT ON u FOR EACH ROW BEGIN SET @a = 1; END"
                    .into(),
            }],
            ..Plan::default()
        };
        assert_eq!(phase_script(&plan, "undo"), "");
        assert_eq!(
            phase_script(&plan, "after"),
            "DELIMITER ;;\nUSE `shop`;;\nSET SESSION sql_mode = '';;\n\
             CREATE TRIGGER t BEFORE INSERT ON u FOR EACH ROW BEGIN SET @a = 1; END\n;;\n"
        );
    }
}
