//! Backups and restores of an app's PostgreSQL database with the stock client
//! programs (`psql`, `pg_dump`, `pg_restore`), run with an explicit argv from
//! the target's bindir, each under a timeout.
//!
//! # Who connects as whom
//!
//! A [`PgTarget`] names two identities:
//!
//! - `os_user`, the system account that runs the client programs (the agent
//!   runs as root and switches to it). Its same-named database role does the
//!   administration: `CREATE`, `ALTER ... RENAME` and `DROP DATABASE` and
//!   ending sessions, all from the `postgres` maintenance database. The usual
//!   setup is `os_user = "postgres"`: a superuser reached by peer
//!   authentication over the unix socket, with no password anywhere.
//! - `user`, the role for the data itself: `pg_dump`, `pg_restore`, the row
//!   counts. It may be the app's own role, non-superuser, as long as it owns
//!   the database and its objects (then the restore recreates them owned by
//!   it, exactly as they were); left unset, it is the `os_user`'s role too, and
//!   a superuser restores every object with its recorded owner.
//!
//! Without `os_user`, everything runs as the agent's own user and
//! connects as `user`, which then needs `CREATEDB` and ownership of the
//! database to administer it.
//!
//! # Dumps
//!
//! A dump is `pg_dump --format=custom --compress=0` compressed by the agent
//! with multi-threaded zstd (with a content checksum, so that damage is
//! detected when it is read back), never written uncompressed to disk.
//!
//! # Limits
//!
//! A restore goes into a new database created like the live one (owner,
//! encoding, collation, ctype; libc locale provider). What belongs to the
//! database itself rather than to its contents (settings from `ALTER
//! DATABASE ... SET` and `ALTER ROLE ... IN DATABASE ... SET`, its comment,
//! connection limit and privileges) is not in a dump made without
//! `--create`: the restore carries it over from the live database before
//! the swap, so the restored data comes back under the database's current
//! configuration. A property the admin role may not set (e.g. another
//! role's settings without CREATEROLE) stays with the kept database, and the
//! outcome says which.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin};
use tokio::sync::mpsc;

use super::{
    CHUNK, DbError, DumpStats, Dumped, Kind, RestoreOutcome, SwapNames, check_counts,
    create_private, finish_zstd, plain_name, quote_ident, read_full, sync_parent, zstd_writer,
};
use crate::host::process::{ProcessBuilder, ProcessError, RunAs, canceled, read_capped};

/// The database that administrative statements connect to.
const MAINTENANCE_DB: &str = "postgres";
/// PostgreSQL's NAMEDATALEN - 1: longer identifiers are silently truncated.
const MAX_NAME_LEN: usize = 63;
/// Programs a usable bindir must hold.
const CLIENT_PROGRAMS: [&str; 3] = ["pg_dump", "pg_restore", "psql"];
const PG_CONFIG_TIMEOUT: Duration = Duration::from_secs(10);
/// Chunks in flight between the two sides: bounds memory, keeps both busy.
const PIPELINE_DEPTH: usize = 8;
/// Attempts at the final rename when sessions keep coming back to the live db.
const SWAP_ATTEMPTS: u32 = 3;
const SWAP_RETRY_DELAY: Duration = Duration::from_secs(1);
/// SQLSTATE object_in_use: "database ... is being accessed by other users".
const OBJECT_IN_USE: &str = "55006";

/// Where and how to reach an app's database (from its config: dbname, host =
/// socket dir or hostname, port, user = DB role, os_user = system user that
/// runs the client programs).
#[derive(Debug, Clone)]
pub struct PgTarget {
    pub dbname: String,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub user: Option<String>,
    pub os_user: Option<String>,
    pub bindir: PathBuf,
}

impl PgTarget {
    /// bindir: `pg_config --bindir` if it runs (and that directory has the
    /// client programs), else the highest /usr/lib/postgresql/*/bin
    /// containing pg_dump. Blocks for at most 10 s (pg_config).
    pub fn discover_bindir() -> Result<PathBuf, DbError> {
        if let Some(dir) = pg_config_bindir()
            && has_client_programs(&dir)
        {
            return Ok(dir);
        }
        newest_debian_bindir().ok_or(DbError::NoClientPrograms)
    }

    /// The same server and identities, another database.
    fn on_db(&self, dbname: &str) -> PgTarget {
        PgTarget {
            dbname: dbname.to_owned(),
            ..self.clone()
        }
    }

    /// The role for data: `user`, else libpq's default (the OS user's name).
    fn data_role(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// The role for administration: see the module documentation.
    fn admin_role(&self) -> Option<&str> {
        self.os_user.as_deref().or(self.user.as_deref())
    }
}

// ---------------------------------------------------------------------------
// Public operations

/// Runs one of the agent's own read-only statistics scripts (metric
/// analysis: `pg_stat_activity`, `pg_locks`, `pg_stat_statements`) on the
/// app's database as its data role; psql's unaligned tuples-only output.
pub async fn stats_query(
    t: &PgTarget,
    script: &'static str,
    timeout: Duration,
) -> Result<String, DbError> {
    validate_name("database name", &t.dbname)?;
    psql(t, t.data_role(), &t.dbname, script, timeout).await
}

/// `SHOW server_version` via psql -X -A -t.
pub async fn server_version(t: &PgTarget, timeout: Duration) -> Result<String, DbError> {
    validate_name("database name", &t.dbname)?;
    let out = psql(t, t.data_role(), &t.dbname, "SHOW server_version;", timeout).await?;
    let version = out.trim();
    if version.is_empty() {
        return Err(unexpected("psql", "empty server_version"));
    }
    Ok(version.to_owned())
}

/// Exact row counts of every ordinary table in non-system schemas, keyed
/// "schema.table" (count(*) each, in one psql run; identifiers quoted
/// safely). All counts come from one snapshot.
pub async fn row_counts(t: &PgTarget, timeout: Duration) -> Result<BTreeMap<String, u64>, DbError> {
    validate_name("database name", &t.dbname)?;
    // `\gexec` runs one generated count per table. Each prints a JSON array,
    // on one line whatever characters the names hold.
    let script = "\
BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY;
SELECT format('SELECT json_build_array(%L, %L, count(*)) FROM %I.%I',
              n.nspname, c.relname, n.nspname, c.relname)
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind = 'r' AND n.nspname <> 'information_schema' AND n.nspname !~ '^pg_'
 ORDER BY n.nspname, c.relname
\\gexec
COMMIT;
";
    let out = psql(t, t.data_role(), &t.dbname, script, timeout).await?;
    parse_counts(&out)
}

/// pg_dump -Fc -Z0 (uncompressed custom format) streamed from its stdout into
/// a multi-threaded zstd encoder (all cores, level 3) writing `dest`
/// (created, mode 0600, never overwritten; fsynced at the end); no temp copy.
/// on_bytes(uncompressed bytes so far). Fails (and removes dest) on non-zero
/// exit, with stderr in the error, on timeout and when `cancel` is set.
pub async fn dump(
    t: &PgTarget,
    dest: &Path,
    timeout: Duration,
    on_bytes: &(dyn Fn(u64) + Send + Sync),
    cancel: &AtomicBool,
) -> Result<DumpStats, DbError> {
    validate_name("database name", &t.dbname)?;
    into_new_file(dest, "pg_dump", timeout, cancel, |file| {
        dump_into(t, file, dest, on_bytes)
    })
    .await
}

/// Runs `work` on `dest` (created, mode 0600, never over a file) under
/// `timeout` (named after `program`) and `cancel`; removes `dest` when it
/// fails.
pub(super) async fn into_new_file<T, F: Future<Output = Result<T, DbError>>>(
    dest: &Path,
    program: &str,
    timeout: Duration,
    cancel: &AtomicBool,
    work: impl FnOnce(File) -> F,
) -> Result<T, DbError> {
    let file = create_private(dest, "create dump file")?;
    let done = tokio::select! {
        done = Box::pin(within(program, timeout, work(file))) => done,
        () = canceled(cancel) => Err(DbError::Canceled),
    };
    if done.is_err() {
        // Ours since create_new: an incomplete dump must not pass for a backup.
        if let Err(e) = std::fs::remove_file(dest) {
            tracing::warn!("could not remove incomplete dump {}: {e}", dest.display());
        }
    }
    done
}

/// Decompresses the dump and feeds it to `pg_restore --list` (via stdin);
/// returns the TOC lines. Fails on a corrupt dump: the whole file is
/// decompressed and its checksum verified, although pg_restore only reads
/// the table of contents.
pub async fn list_dump(
    t: &PgTarget,
    dump: &Path,
    timeout: Duration,
) -> Result<Vec<String>, DbError> {
    let pg_restore = Program::new(t, "pg_restore")?.with(|c| c.arg("--list"));
    let out = run_fed(pg_restore, dump, true, timeout).await?;
    Ok(out.lines().map(str::to_owned).collect())
}

/// Verifies the dump (see [`list_dump`]), then restores into a NEW database
/// `{dbname}_restore_{restore_id}` (created like
/// the live one, owned by its owner) with `pg_restore --exit-on-error
/// --single-transaction` connected as `user`, keeping the recorded owners;
/// checks exact row counts against `expected` (every table in `expected` must
/// match), then swaps names in one transaction on the `postgres` database:
/// ends the other sessions on the live db, renames live ->
/// `{dbname}_before_{restore_id}` and new -> `{dbname}`. If anything fails
/// before the swap, drops the new database and leaves the live one untouched.
/// Run again with the same id after its swap committed (a crash), it does
/// nothing. `timeout` applies to each program run.
pub async fn restore_swap(
    t: &PgTarget,
    dump: &Path,
    restore_id: &str,
    expected: &BTreeMap<String, u64>,
    timeout: Duration,
) -> Result<RestoreOutcome, DbError> {
    SwapNames::new(&t.dbname, restore_id, validate_name)?;
    // A whole decompression pass first: a damaged dump is reported as such
    // before the server is touched, not as whatever pg_restore makes of it.
    list_dump(t, dump, timeout).await?;
    restore_swap_checked(t, dump, restore_id, expected, timeout).await
}

/// [`restore_swap`] without the listing pass, for a dump whose checksum the
/// caller verified or that its own operation wrote (a rollback): a damaged
/// one still fails in pg_restore, before the swap, leaving the live
/// database untouched.
pub async fn restore_swap_checked(
    t: &PgTarget,
    dump: &Path,
    restore_id: &str,
    expected: &BTreeMap<String, u64>,
    timeout: Duration,
) -> Result<RestoreOutcome, DbError> {
    let names = SwapNames::new(&t.dbname, restore_id, validate_name)?;
    let (live, properties) = match prepare_restore(t, &names, timeout).await {
        Ok(live) => live,
        // The kept name exists only once this restore's swap committed: a
        // restore run again after a crash is done.
        Err(DbError::AlreadyExists(kept)) if kept == names.kept => {
            tracing::info!("{} was already restored as {kept} was kept", names.live);
            return Ok(RestoreOutcome {
                kept_as: kept,
                not_carried: Vec::new(),
            });
        }
        Err(e) => return Err(e),
    };
    create_like(t, &names.fresh, &live, timeout).await?;
    let restored = async {
        fill(t, dump, &names.fresh, timeout).await?;
        check_counts(
            expected,
            &row_counts(&t.on_db(&names.fresh), timeout).await?,
        )?;
        let not_carried = carry_properties(t, &names, &live.owner, &properties, timeout).await?;
        swap(t, &names, timeout).await?;
        Ok(not_carried)
    }
    .await;
    let outcome = |not_carried| RestoreOutcome {
        kept_as: names.kept.clone(),
        not_carried,
    };
    let error = match restored {
        Ok(not_carried) => return Ok(outcome(not_carried)),
        Err(error) => error,
    };
    if swap_committed(t, &names, timeout).await {
        // psql was killed (timeout) after it had sent COMMIT, which went through.
        tracing::warn!("the swap to {} committed although: {error}", names.live);
        return Ok(outcome(Vec::new()));
    }
    Err(discard(t, &names.fresh, error, timeout).await)
}

/// Drops a kept database (`{dbname}_before_{id}`, as restore_swap names it);
/// refuses names not of that form. Nothing to do if it is already gone.
pub async fn drop_kept(t: &PgTarget, kept: &str, timeout: Duration) -> Result<(), DbError> {
    SwapNames::check_kept(&t.dbname, kept, validate_name)?;
    let sql = format!("DROP DATABASE IF EXISTS {};", quote_ident(kept));
    admin_psql(t, &sql, timeout).await.map(drop)
}

impl Kind for PgTarget {
    const FORMAT: &'static str = "pg_dump-custom+zstd";

    fn name(&self) -> String {
        self.dbname.clone()
    }

    fn dump_description(&self) -> String {
        format!("pg_dump -Fc of {} through zstd", self.dbname)
    }

    async fn server_version(&self, timeout: Duration) -> Result<String, DbError> {
        server_version(self, timeout).await
    }

    async fn dump(
        &self,
        dest: &Path,
        timeout: Duration,
        on_bytes: &(dyn Fn(u64) + Send + Sync),
        cancel: &AtomicBool,
    ) -> Result<Dumped, DbError> {
        // Counted before the dump: the app is expected to be quiet (it is
        // stopped or idle during an upgrade's backup).
        let row_counts = row_counts(self, timeout).await?;
        let stats = dump(self, dest, timeout, on_bytes, cancel).await?;
        Ok(Dumped { stats, row_counts })
    }

    async fn restore_swap_checked(
        &self,
        dump: &Path,
        restore_id: &str,
        expected: &BTreeMap<String, u64>,
        timeout: Duration,
    ) -> Result<RestoreOutcome, DbError> {
        restore_swap_checked(self, dump, restore_id, expected, timeout).await
    }

    async fn restore_swap(
        &self,
        dump: &Path,
        restore_id: &str,
        expected: &BTreeMap<String, u64>,
        timeout: Duration,
    ) -> Result<RestoreOutcome, DbError> {
        restore_swap(self, dump, restore_id, expected, timeout).await
    }

    async fn drop_kept(&self, kept: &str, timeout: Duration) -> Result<(), DbError> {
        drop_kept(self, kept, timeout).await
    }
}

// ---------------------------------------------------------------------------
// Names and quoting

/// Only `[A-Za-z0-9_]`, 1 to 63 bytes: PostgreSQL keeps such names whole.
fn validate_name(what: &'static str, name: &str) -> Result<(), DbError> {
    plain_name(what, name, MAX_NAME_LEN, "PostgreSQL keeps only")
}

/// A string literal (standard_conforming_strings, the default since 9.1).
fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

// ---------------------------------------------------------------------------
// Restore steps

/// A database as pg_database describes it.
#[derive(Debug, serde::Deserialize)]
struct DbInfo {
    name: String,
    owner: String,
    encoding: String,
    collate: String,
    ctype: String,
}

/// Checks that the live db exists and the kept name is free; drops a
/// `_restore_` database left by an interrupted attempt with the same id (the
/// name is ours: nothing else creates it).
async fn prepare_restore(
    t: &PgTarget,
    names: &SwapNames,
    timeout: Duration,
) -> Result<(DbInfo, DbProperties), DbError> {
    // One psql for both: every program started is time the app is down.
    let script = format!(
        "{}\n{}",
        databases_sql(&[&names.live, &names.fresh, &names.kept]),
        properties_sql(&names.live)
    );
    let out = admin_psql(t, &script, timeout).await?;
    let mut lines = out.lines().map(str::trim).filter(|l| !l.is_empty());
    let mut found: Vec<DbInfo> = serde_json::from_str(lines.next().unwrap_or("[]"))
        .map_err(|e| unexpected("psql", format!("pg_database: {e}")))?;
    if found.iter().any(|db| db.name == names.kept) {
        return Err(DbError::AlreadyExists(names.kept.clone()));
    }
    if found.iter().any(|db| db.name == names.fresh) {
        tracing::warn!(
            "dropping {}, left by an earlier restore with the same id",
            names.fresh
        );
        drop_database(t, &names.fresh, timeout).await?;
    }
    let live = found.iter().position(|db| db.name == names.live);
    let live = live
        .map(|i| found.swap_remove(i))
        .ok_or_else(|| DbError::NoSuchDatabase(names.live.clone()))?;
    let properties = match lines.next() {
        Some(line) => serde_json::from_str(line)
            .map_err(|e| unexpected("psql", format!("properties of {}: {e}", names.live)))?,
        None => return Err(DbError::NoSuchDatabase(names.live.clone())),
    };
    Ok((live, properties))
}

/// Those of `names` that exist.
async fn databases(
    t: &PgTarget,
    names: &[&str],
    timeout: Duration,
) -> Result<Vec<DbInfo>, DbError> {
    let out = admin_psql(t, &databases_sql(names), timeout).await?;
    serde_json::from_str(out.trim()).map_err(|e| unexpected("psql", format!("pg_database: {e}")))
}

/// One line of JSON: those of `names` that exist, as [`DbInfo`]s.
fn databases_sql(names: &[&str]) -> String {
    let list = names
        .iter()
        .map(|n| quote_literal(n))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "SELECT coalesce(json_agg(json_build_object(\
           'name', datname, 'owner', pg_get_userbyid(datdba), \
           'encoding', pg_encoding_to_char(encoding), \
           'collate', datcollate, 'ctype', datctype)), '[]') \
         FROM pg_database WHERE datname IN ({list});"
    )
}

/// An empty database that can take a dump of `like`.
async fn create_like(
    t: &PgTarget,
    name: &str,
    like: &DbInfo,
    timeout: Duration,
) -> Result<(), DbError> {
    // template0: template1 may hold objects that would clash with the dump's.
    let sql = format!(
        "CREATE DATABASE {} OWNER {} TEMPLATE template0 ENCODING {} LC_COLLATE {} LC_CTYPE {};",
        quote_ident(name),
        quote_ident(&like.owner),
        quote_literal(&like.encoding),
        quote_literal(&like.collate),
        quote_literal(&like.ctype),
    );
    admin_psql(t, &sql, timeout).await.map(drop)
}

/// pg_restore of the dump into `db`, as the data role, all or nothing.
async fn fill(t: &PgTarget, dump: &Path, db: &str, timeout: Duration) -> Result<(), DbError> {
    // No --no-owner: objects get their recorded owners back (a no-op when
    // the data role is that owner). Custom format reads fine from a pipe for
    // a serial restore; only --jobs needs a seekable file.
    let pg_restore = Program::new(t, "pg_restore")?.with(|c| {
        c.args(["--exit-on-error", "--single-transaction", "--no-password"])
            .args(connection_args(t, t.data_role(), db))
    });
    run_fed(pg_restore, dump, false, timeout).await.map(drop)
}

/// What belongs to a database rather than to its contents, as the catalog
/// holds it.
#[derive(Debug, Default, serde::Deserialize)]
struct DbProperties {
    comment: Option<String>,
    connlimit: i32,
    /// None: the default privileges (no ACL at all).
    acl: Option<Vec<AclEntry>>,
    settings: Vec<DbSettings>,
}

#[derive(Debug, serde::Deserialize)]
struct AclEntry {
    /// None: PUBLIC.
    grantee: Option<String>,
    privilege: String,
    grantable: bool,
}

/// One row of pg_db_role_setting: `role` None for the whole database.
#[derive(Debug, serde::Deserialize)]
struct DbSettings {
    role: Option<String>,
    config: Vec<String>,
}

/// One line of JSON (none when it does not exist): database `name`'s
/// [`DbProperties`].
fn properties_sql(name: &str) -> String {
    format!(
        "SELECT json_build_object(\
           'comment', shobj_description(d.oid, 'pg_database'), \
           'connlimit', d.datconnlimit, \
           'acl', CASE WHEN d.datacl IS NULL THEN NULL ELSE (\
             SELECT coalesce(json_agg(json_build_object(\
               'grantee', CASE WHEN a.grantee = 0 THEN NULL ELSE pg_get_userbyid(a.grantee) END, \
               'privilege', a.privilege_type, 'grantable', a.is_grantable)), '[]') \
             FROM aclexplode(d.datacl) a) END, \
           'settings', (SELECT coalesce(json_agg(json_build_object(\
               'role', CASE WHEN s.setrole = 0 THEN NULL ELSE pg_get_userbyid(s.setrole) END, \
               'config', s.setconfig)), '[]') \
             FROM pg_db_role_setting s WHERE s.setdatabase = d.oid)) \
         FROM pg_database d WHERE d.datname = {};",
        quote_literal(name)
    )
}

/// The statements that give database `db` (owned by `owner`) the properties
/// `p`, each with what it carries (for a message if the server refuses it).
fn property_statements(db: &str, owner: &str, p: &DbProperties) -> Vec<(String, String)> {
    let db_id = quote_ident(db);
    let mut out = Vec::new();
    if let Some(comment) = &p.comment {
        out.push((
            "the comment".to_owned(),
            format!("COMMENT ON DATABASE {db_id} IS {};", quote_literal(comment)),
        ));
    }
    if p.connlimit != -1 {
        out.push((
            format!("CONNECTION LIMIT {}", p.connlimit),
            format!("ALTER DATABASE {db_id} CONNECTION LIMIT {};", p.connlimit),
        ));
    }
    for settings in &p.settings {
        for item in &settings.config {
            let Some((name, value)) = item.split_once('=') else {
                continue;
            };
            let value = setting_value(name, value);
            let (what, sql) = match &settings.role {
                None => (
                    format!("SET {name}"),
                    format!(
                        "ALTER DATABASE {db_id} SET {} TO {value};",
                        quote_ident(name)
                    ),
                ),
                Some(role) => (
                    format!("SET {name} for role {role}"),
                    format!(
                        "ALTER ROLE {} IN DATABASE {db_id} SET {} TO {value};",
                        quote_ident(role),
                        quote_ident(name)
                    ),
                ),
            };
            out.push((what, sql));
        }
    }
    if let Some(acl) = &p.acl {
        // From nothing to exactly the live ACL (the owner's own rights are
        // entries of it too).
        out.push((
            "privileges".to_owned(),
            format!(
                "REVOKE ALL ON DATABASE {db_id} FROM PUBLIC, {};",
                quote_ident(owner)
            ),
        ));
        for entry in acl {
            // aclexplode names only these; anything else is not ours to pass on.
            if !matches!(entry.privilege.as_str(), "CREATE" | "CONNECT" | "TEMPORARY") {
                continue;
            }
            let grantee = entry
                .grantee
                .as_deref()
                .map_or_else(|| "PUBLIC".to_owned(), quote_ident);
            out.push((
                format!("{} for {grantee}", entry.privilege),
                format!(
                    "GRANT {} ON DATABASE {db_id} TO {grantee}{};",
                    entry.privilege,
                    if entry.grantable {
                        " WITH GRANT OPTION"
                    } else {
                        ""
                    }
                ),
            ));
        }
    }
    out
}

/// A setting's value as SQL. pg_db_role_setting keeps `name=value` where the
/// value of a list setting (search_path and the like) is already a list of
/// identifiers, double-quoted where needed: those are split and each element
/// becomes a literal, as pg_dump does; any other value is one literal.
fn setting_value(name: &str, value: &str) -> String {
    const LIST_SETTINGS: [&str; 6] = [
        "local_preload_libraries",
        "search_path",
        "session_preload_libraries",
        "shared_preload_libraries",
        "temp_tablespaces",
        "unix_socket_directories",
    ];
    if !LIST_SETTINGS.contains(&name.to_ascii_lowercase().as_str()) {
        return quote_literal(value);
    }
    split_identifier_list(value)
        .iter()
        .map(|e| quote_literal(e))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `"$user", public, "a""b"` → `$user`, `public`, `a"b`.
fn split_identifier_list(list: &str) -> Vec<String> {
    let mut items = Vec::new();
    let mut chars = list.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut item = String::new();
        if chars.next_if_eq(&'"').is_some() {
            while let Some(c) = chars.next() {
                // A doubled quote is a quote; a single one ends the item.
                if c == '"' && chars.next_if_eq(&'"').is_none() {
                    break;
                }
                item.push(c);
            }
        } else {
            while let Some(c) = chars.next_if(|&c| c != ',' && !c.is_whitespace()) {
                item.push(c);
            }
        }
        items.push(item);
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next_if_eq(&',').is_none() {
            return items;
        }
    }
}

/// Gives the restored database the live one's properties, one statement at
/// a time (each refusal stays a note, not a failed restore); returns what
/// was not carried over.
async fn carry_properties(
    t: &PgTarget,
    names: &SwapNames,
    owner: &str,
    properties: &DbProperties,
    timeout: Duration,
) -> Result<Vec<String>, DbError> {
    let mut not_carried = Vec::new();
    for (what, sql) in property_statements(&names.fresh, owner, properties) {
        match admin_psql(t, &sql, timeout).await {
            Ok(_) => {}
            Err(DbError::Tool { stderr, .. }) => {
                // "psql:<stdin>:1: ERROR:  42501: permission denied" → from ERROR on.
                let reason = stderr
                    .lines()
                    .find_map(|l| l.find("ERROR:").map(|at| &l[at..]))
                    .unwrap_or(&stderr);
                not_carried.push(format!("{what} ({})", reason.trim()));
            }
            Err(other) => return Err(other),
        }
    }
    Ok(not_carried)
}

/// Both renames in one transaction: either the restored db is live and the
/// old one kept, or nothing changed. Sessions on the live db are ended first;
/// one that reconnects in between makes the rename fail (object_in_use), so
/// that is retried a few times.
async fn swap(t: &PgTarget, names: &SwapNames, timeout: Duration) -> Result<(), DbError> {
    let sql = format!(
        "BEGIN;\n\
         SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
           WHERE datname = {live_lit} AND pid <> pg_backend_pid();\n\
         ALTER DATABASE {live} RENAME TO {kept};\n\
         ALTER DATABASE {fresh} RENAME TO {live};\n\
         COMMIT;\n",
        live_lit = quote_literal(&names.live),
        live = quote_ident(&names.live),
        kept = quote_ident(&names.kept),
        fresh = quote_ident(&names.fresh),
    );
    let mut attempt = 1;
    loop {
        match admin_psql(t, &sql, timeout).await {
            Err(DbError::Tool { stderr, .. })
                if stderr.contains(OBJECT_IN_USE) && attempt < SWAP_ATTEMPTS =>
            {
                tracing::warn!("{} still in use, renaming again: {stderr}", names.live);
                attempt += 1;
                tokio::time::sleep(SWAP_RETRY_DELAY).await;
            }
            other => return other.map(drop),
        }
    }
}

/// Whether the renames happened: the new name is gone, the kept one exists.
async fn swap_committed(t: &PgTarget, names: &SwapNames, timeout: Duration) -> bool {
    databases(t, &[&names.fresh, &names.kept], timeout)
        .await
        .is_ok_and(|found| found.len() == 1 && found[0].name == names.kept)
}

/// Drops the new database after `error`; a failure to do so is reported
/// with it.
async fn discard(t: &PgTarget, fresh: &str, error: DbError, timeout: Duration) -> DbError {
    match drop_database(t, fresh, timeout).await {
        Ok(()) => error,
        Err(cleanup) => DbError::Leftover {
            source: Box::new(error),
            leftover: fresh.to_owned(),
            cleanup: Box::new(cleanup),
        },
    }
}

/// Drops a database we created, ending sessions pg_restore may have left.
async fn drop_database(t: &PgTarget, name: &str, timeout: Duration) -> Result<(), DbError> {
    let sql = format!(
        "DROP DATABASE IF EXISTS {} WITH (FORCE);",
        quote_ident(name)
    );
    admin_psql(t, &sql, timeout).await.map(drop)
}

// ---------------------------------------------------------------------------
// psql

/// Runs a script (`-f -`, from stdin) on the maintenance database as the
/// admin role.
async fn admin_psql(t: &PgTarget, script: &str, timeout: Duration) -> Result<String, DbError> {
    psql(t, t.admin_role(), MAINTENANCE_DB, script, timeout).await
}

/// Runs a script with `psql -X -v ON_ERROR_STOP=1 -A -t -q`; its stdout.
async fn psql(
    t: &PgTarget,
    role: Option<&str>,
    db: &str,
    script: &str,
    timeout: Duration,
) -> Result<String, DbError> {
    let psql = Program::new(t, "psql")?.with(|c| {
        c.args([
            "-X",
            "-v",
            "ON_ERROR_STOP=1",
            "-A",
            "-t",
            "-q",
            "--no-password",
        ])
        // SQLSTATEs in messages: swap() recognizes "in use" by its code.
        .args(["-v", "VERBOSITY=verbose", "-f", "-"])
        .args(connection_args(t, role, db))
        // Names and counts are parsed as UTF-8, whatever the agent's locale.
        .env("PGCLIENTENCODING", "UTF8")
    });
    // On the heap: the futures of whole backups and upgrades hold this one.
    Box::pin(run(psql, script.as_bytes(), timeout)).await
}

fn parse_counts(out: &str) -> Result<BTreeMap<String, u64>, DbError> {
    out.lines()
        .filter(|line| !line.is_empty())
        .map(|line| {
            let (schema, table, count): (String, String, u64) = serde_json::from_str(line)
                .map_err(|e| unexpected("psql", format!("row count {line:?}: {e}")))?;
            Ok((format!("{schema}.{table}"), count))
        })
        .collect()
}

pub(super) fn unexpected(program: &str, detail: impl Into<String>) -> DbError {
    DbError::UnexpectedOutput {
        program: program.to_owned(),
        detail: detail.into(),
    }
}

// ---------------------------------------------------------------------------
// Dump pipeline: pg_dump stdout -> channel -> zstd on a blocking thread.

async fn dump_into(
    t: &PgTarget,
    file: File,
    dest: &Path,
    on_bytes: &(dyn Fn(u64) + Send + Sync),
) -> Result<DumpStats, DbError> {
    let pg_dump = Program::new(t, "pg_dump")?.with(|c| {
        c.args(["--format=custom", "--compress=0", "--no-password"])
            .args(connection_args(t, t.data_role(), &t.dbname))
    });
    let mut child = pg_dump.spawn()?;
    let (stdout, stderr) = (take(child.stdout.take())?, take(child.stderr.take())?);
    let (tx, rx) = mpsc::channel(PIPELINE_DEPTH);
    let compressor = tokio::task::spawn_blocking(move || compress(file, rx));
    let (pumped, stderr) = tokio::join!(pump(stdout, tx, on_bytes), read_capped(stderr));
    let status = child
        .wait()
        .await
        .map_err(DbError::io("wait for pg_dump"))?;
    // The compressor's error first: when it fails (disk full) pg_dump dies of
    // a broken pipe, which would hide the cause.
    let compressed_bytes = compressor
        .await
        .map_err(|e| DbError::io("zstd compressor")(io::Error::other(e)))?
        .map_err(DbError::io(format!("write {}", dest.display())))?;
    check_status("pg_dump", status, &stderr)?;
    let uncompressed_bytes = pumped.map_err(DbError::io("read pg_dump output"))?;
    sync_parent(dest)?;
    Ok(DumpStats {
        uncompressed_bytes,
        compressed_bytes,
        stderr,
    })
}

/// Copies `from` to the channel in CHUNK-sized pieces; the byte count.
pub(super) async fn pump(
    mut from: impl AsyncRead + Unpin,
    to: mpsc::Sender<Vec<u8>>,
    on_bytes: &(dyn Fn(u64) + Send + Sync),
) -> io::Result<u64> {
    let mut total = 0u64;
    loop {
        let mut chunk = Vec::with_capacity(CHUNK);
        while chunk.len() < CHUNK {
            if from.read_buf(&mut chunk).await? == 0 {
                break;
            }
        }
        if chunk.is_empty() {
            return Ok(total);
        }
        total += chunk.len() as u64;
        to.send(chunk)
            .await
            .map_err(|_| io::Error::other("the compressor stopped"))?;
        on_bytes(total);
    }
}

/// zstd (see [`zstd_writer`]) of the chunks, fsynced. Ends when the sender
/// is dropped. Returns the compressed size.
fn compress(file: File, chunks: mpsc::Receiver<Vec<u8>>) -> io::Result<u64> {
    compress_inspecting(file, chunks, |_| {})
}

/// [`compress`], showing each chunk to `inspect` first (MySQL counts rows
/// in the dump as it goes by).
pub(super) fn compress_inspecting(
    file: File,
    mut chunks: mpsc::Receiver<Vec<u8>>,
    mut inspect: impl FnMut(&[u8]),
) -> io::Result<u64> {
    let mut encoder = zstd_writer(file)?;
    while let Some(chunk) = chunks.blocking_recv() {
        inspect(&chunk);
        encoder.write_all(&chunk)?;
    }
    finish_zstd(encoder)
}

// ---------------------------------------------------------------------------
// Restore pipeline: zstd on a blocking thread -> channel -> program's stdin.

/// Runs a program with the decompressed dump on its stdin; its stdout.
/// `to_end`: keep decompressing after the program stopped reading, so that
/// damage anywhere in the file is detected.
pub(super) async fn run_fed(
    prog: Program,
    dump: &Path,
    to_end: bool,
    timeout: Duration,
) -> Result<String, DbError> {
    let program = prog.name;
    let prog = prog.with(ProcessBuilder::stdin_piped);
    let work = async {
        let mut child = prog.spawn()?;
        let stdin = take(child.stdin.take())?;
        let (stdout, stderr) = (take(child.stdout.take())?, take(child.stderr.take())?);
        let (fed, out, err) = tokio::join!(
            feed(dump, stdin, to_end),
            read_all(stdout),
            read_capped(stderr)
        );
        let status = child
            .wait()
            .await
            .map_err(DbError::io(format!("wait for {program}")))?;
        // A damaged dump explains whatever the program made of it.
        fed?;
        check_status(program, status, &err)?;
        out.map_err(DbError::io(format!("read {program} output")))
    };
    Box::pin(within(program, timeout, work)).await
}

/// Writes the decompressed dump to `stdin`, then closes it.
async fn feed(dump: &Path, stdin: ChildStdin, to_end: bool) -> Result<(), DbError> {
    let file = File::open(dump).map_err(DbError::io(format!("open dump {}", dump.display())))?;
    let (tx, mut rx) = mpsc::channel(PIPELINE_DEPTH);
    let path = dump.to_owned();
    let decompressor = tokio::task::spawn_blocking(move || decompress(file, &path, tx));
    let mut stdin = Some(stdin);
    while let Some(chunk) = rx.recv().await {
        let Some(pipe) = stdin.as_mut() else {
            continue; // draining, to verify the rest
        };
        match pipe.write_all(&chunk).await {
            Ok(()) => {}
            // The program has read all it wanted; its exit status tells how
            // that went.
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                stdin = None;
                if !to_end {
                    break;
                }
            }
            Err(e) => return Err(DbError::io("write the dump to its reader")(e)),
        }
    }
    drop(stdin);
    drop(rx);
    decompressor
        .await
        .map_err(|e| DbError::io("zstd decompressor")(io::Error::other(e)))?
}

/// Sends the decompressed dump in chunks; stops quietly when the receiver
/// goes away.
pub(super) fn decompress(
    file: File,
    path: &Path,
    to: mpsc::Sender<Vec<u8>>,
) -> Result<(), DbError> {
    let corrupt = |source| DbError::CorruptDump {
        path: path.to_owned(),
        source,
    };
    let mut decoder = zstd::Decoder::new(file).map_err(corrupt)?;
    loop {
        let mut chunk = vec![0; CHUNK];
        let n = read_full(&mut decoder, &mut chunk).map_err(corrupt)?;
        if n == 0 {
            return Ok(());
        }
        chunk.truncate(n);
        if to.blocking_send(chunk).is_err() {
            return Ok(());
        }
    }
}

// ---------------------------------------------------------------------------
// Processes

/// A client program ready to run, with what its messages need.
pub(super) struct Program {
    command: ProcessBuilder,
    name: &'static str,
    /// The os_user it runs as, if any.
    as_user: Option<String>,
}

impl Program {
    /// `name` from the bindir, run as the os_user (if any) from `/`, its
    /// stdin closed and its output piped, killed when dropped; its
    /// environment only PATH, HOME (the os_user's, else the agent's) and
    /// USER.
    ///
    /// The user is switched by the runner itself rather than by `runuser`:
    /// no PAM session, no extra process between us and the program, so a
    /// kill on timeout reaches the program itself.
    fn new(t: &PgTarget, name: &'static str) -> Result<Program, DbError> {
        Program::at(&t.bindir, t.os_user.as_deref(), name)
    }

    /// `name` from `bindir`, run as `os_user`: see [`Program::new`].
    pub(super) fn at(
        bindir: &Path,
        os_user: Option<&str>,
        name: &'static str,
    ) -> Result<Program, DbError> {
        if !bindir.is_absolute() {
            return Err(DbError::RelativeBindir(bindir.to_owned()));
        }
        let mut command = ProcessBuilder::new(bindir.join(name)).current_dir("/");
        match os_user {
            // libpq finds ~/.pgpass and ~/.pg_service.conf in its home, not in root's.
            Some(user) => {
                let run_as = RunAs::lookup(user).map_err(|e| from_process(name, None, e))?;
                command = command.user(run_as);
            }
            None => {
                if let Some(home) = std::env::var_os("HOME") {
                    command = command.env("HOME", home);
                }
            }
        }
        Ok(Program {
            command,
            name,
            as_user: os_user.map(str::to_owned),
        })
    }

    /// The same program with `change` made to its command.
    pub(super) fn with(mut self, change: impl FnOnce(ProcessBuilder) -> ProcessBuilder) -> Program {
        self.command = change(self.command);
        self
    }

    pub(super) fn spawn(self) -> Result<Child, DbError> {
        self.command
            .spawn()
            .map_err(|e| from_process(self.name, self.as_user.as_deref(), e))
    }
}

/// A runner's error in the words of this module: the program by its short
/// name, the user it was to run as.
fn from_process(program: &'static str, as_user: Option<&str>, error: ProcessError) -> DbError {
    match error {
        ProcessError::NotAbsolute(path) => DbError::RelativeBindir(path),
        ProcessError::Spawn {
            program, source, ..
        } => DbError::Spawn {
            program: PathBuf::from(program),
            user: as_user.unwrap_or("the agent's own user").to_owned(),
            source,
        },
        ProcessError::UnknownUser(name) => DbError::UnknownOsUser(name),
        ProcessError::UserLookup { name, source } => {
            DbError::io(format!("look up system user {name:?}"))(source)
        }
        ProcessError::Timeout { after, .. } => DbError::Timeout {
            program: program.to_owned(),
            after,
        },
        ProcessError::Failed { status, tail, .. } => DbError::Tool {
            program: program.to_owned(),
            status,
            stderr: tail.join("\n"),
        },
        ProcessError::Canceled => DbError::Canceled,
        ProcessError::Io { context, source } => DbError::Io { context, source },
    }
}

/// `-h -p -U -d`, those that are set.
fn connection_args(t: &PgTarget, role: Option<&str>, db: &str) -> Vec<OsString> {
    let mut args: Vec<OsString> = Vec::new();
    if let Some(host) = &t.host {
        args.extend(["-h".into(), host.into()]);
    }
    if let Some(port) = t.port {
        args.extend(["-p".into(), port.to_string().into()]);
    }
    if let Some(role) = role {
        args.extend(["-U".into(), role.into()]);
    }
    args.extend(["-d".into(), db.into()]);
    args
}

/// Runs a program to completion with `input` on its stdin; its stdout.
pub(super) async fn run(prog: Program, input: &[u8], timeout: Duration) -> Result<String, DbError> {
    let Program {
        command,
        name,
        as_user,
    } = prog;
    let out = command
        .stdin_bytes(input)
        .timeout(timeout)
        .output()
        .await
        .map_err(|e| from_process(name, as_user.as_deref(), e))?;
    check_status(name, out.status, &out.stderr)?;
    String::from_utf8(out.stdout).map_err(|e| {
        DbError::io(format!("read {name} output"))(io::Error::new(io::ErrorKind::InvalidData, e))
    })
}

/// A piped stdio handle: only missing if we forgot to ask for it.
pub(super) fn take<T>(pipe: Option<T>) -> Result<T, DbError> {
    pipe.ok_or_else(|| DbError::io("child process")(io::Error::other("stdio pipe missing")))
}

/// `fut`, or a Timeout error after `limit` (dropping `fut` kills its child).
pub(super) async fn within<T>(
    program: &str,
    limit: Duration,
    fut: impl Future<Output = Result<T, DbError>>,
) -> Result<T, DbError> {
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| DbError::Timeout {
            program: program.to_owned(),
            after: limit,
        })?
}

pub(super) fn check_status(program: &str, status: ExitStatus, stderr: &str) -> Result<(), DbError> {
    if status.success() {
        return Ok(());
    }
    let stderr = stderr.trim();
    Err(DbError::Tool {
        program: program.to_owned(),
        status,
        stderr: if stderr.is_empty() {
            "(no error output)".to_owned()
        } else {
            stderr.to_owned()
        },
    })
}

async fn read_all(mut r: impl AsyncRead + Unpin) -> io::Result<String> {
    let mut buf = Vec::new();
    r.read_to_end(&mut buf).await?;
    String::from_utf8(buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

// ---------------------------------------------------------------------------
// Finding the client programs

fn has_client_programs(dir: &Path) -> bool {
    CLIENT_PROGRAMS.iter().all(|p| dir.join(p).is_file())
}

/// `pg_config --bindir`, pg_config found on PATH (absolute entries only).
fn pg_config_bindir() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    let pg_config = std::env::split_paths(&path)
        .filter(|dir| dir.is_absolute())
        .map(|dir| dir.join("pg_config"))
        .find(|p| p.is_file())?;
    let out = run_briefly(&pg_config, &["--bindir"], PG_CONFIG_TIMEOUT)?;
    let dir = PathBuf::from(out.trim());
    dir.is_absolute().then_some(dir)
}

/// The newest /usr/lib/postgresql/<major>/bin with the client programs.
fn newest_debian_bindir() -> Option<PathBuf> {
    std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let major: u32 = e.file_name().to_str()?.parse().ok()?;
            Some((major, e.path().join("bin")))
        })
        .filter(|(_, bin)| has_client_programs(bin))
        .max()
        .map(|(_, bin)| bin)
}

/// A short synchronous run: stdout if the program exits 0 within `limit`.
fn run_briefly(program: &Path, args: &[&str], limit: Duration) -> Option<String> {
    let mut child = ProcessBuilder::new(program)
        .args(args)
        .std_command()
        .ok()?
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => {
                let mut out = String::new();
                child.stdout.take()?.read_to_string(&mut out).ok()?;
                return Some(out);
            }
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(Some(_)) => return None,
            Ok(None) | Err(_) => {
                tracing::warn!("{} did not answer within {limit:?}", program.display());
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
        pairs.iter().map(|&(k, v)| (k.to_owned(), v)).collect()
    }

    /// A target whose "client programs" are the system's coreutils.
    fn coreutils() -> PgTarget {
        PgTarget {
            dbname: "app".into(),
            host: None,
            port: None,
            user: None,
            os_user: None,
            bindir: PathBuf::from("/usr/bin"),
        }
    }

    #[test]
    fn names_are_plain_identifiers_of_at_most_63_bytes() {
        for ok in ["a", "covet_production", "R2_d2", &"x".repeat(63)] {
            assert!(validate_name("name", ok).is_ok(), "{ok}");
        }
        for bad in ["", "a-b", "a b", "a\"b", "é", "a;b", &"x".repeat(64)] {
            assert!(
                matches!(validate_name("name", bad), Err(DbError::InvalidName { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn derived_names_must_fit_too() {
        let names = SwapNames::new("app", "42", validate_name).unwrap();
        assert_eq!(
            (
                names.live.as_str(),
                names.fresh.as_str(),
                names.kept.as_str()
            ),
            ("app", "app_restore_42", "app_before_42")
        );
        let long = "d".repeat(50);
        let err = SwapNames::new(&long, "01234", validate_name).err().unwrap();
        assert!(err.to_string().contains("restore database name"), "{err}");
        assert!(SwapNames::new("app", "", validate_name).is_err());
        assert!(SwapNames::new("app", "x-y", validate_name).is_err());
    }

    #[test]
    fn list_settings_are_split_into_literals_like_pg_dump_does() {
        assert_eq!(
            split_identifier_list(r#""$user", public, "Odd ""Schema""#),
            ["$user", "public", r#"Odd "Schema"#]
        );
        assert_eq!(split_identifier_list("public"), ["public"]);
        assert_eq!(split_identifier_list(r#""""#), [""]);
        assert_eq!(
            setting_value("search_path", r#""$user", public"#),
            "'$user', 'public'"
        );
        // Not a list setting: one literal, commas and quotes kept.
        assert_eq!(
            setting_value("app.tenant", "it's, a test"),
            "'it''s, a test'"
        );
    }

    #[test]
    fn property_statements_cover_comment_limit_settings_and_privileges() {
        let p = DbProperties {
            comment: Some("the shop's".into()),
            connlimit: 50,
            acl: Some(vec![
                AclEntry {
                    grantee: None,
                    privilege: "TEMPORARY".into(),
                    grantable: false,
                },
                AclEntry {
                    grantee: Some("reporter".into()),
                    privilege: "CONNECT".into(),
                    grantable: true,
                },
                AclEntry {
                    grantee: Some("x".into()),
                    privilege: "DROP TABLE; --".into(),
                    grantable: false,
                },
            ]),
            settings: vec![
                DbSettings {
                    role: None,
                    config: vec!["search_path=\"$user\", public".into()],
                },
                DbSettings {
                    role: Some("app".into()),
                    config: vec!["work_mem=8MB".into()],
                },
            ],
        };
        let sql: Vec<String> = property_statements("shop_restore_1", "owner", &p)
            .into_iter()
            .map(|(_, sql)| sql)
            .collect();
        assert_eq!(
            sql,
            [
                r#"COMMENT ON DATABASE "shop_restore_1" IS 'the shop''s';"#,
                r#"ALTER DATABASE "shop_restore_1" CONNECTION LIMIT 50;"#,
                r#"ALTER DATABASE "shop_restore_1" SET "search_path" TO '$user', 'public';"#,
                r#"ALTER ROLE "app" IN DATABASE "shop_restore_1" SET "work_mem" TO '8MB';"#,
                r#"REVOKE ALL ON DATABASE "shop_restore_1" FROM PUBLIC, "owner";"#,
                r#"GRANT TEMPORARY ON DATABASE "shop_restore_1" TO PUBLIC;"#,
                r#"GRANT CONNECT ON DATABASE "shop_restore_1" TO "reporter" WITH GRANT OPTION;"#,
            ]
        );
        // Default privileges, no limit, nothing set: nothing to do.
        assert!(
            property_statements(
                "d",
                "o",
                &DbProperties {
                    connlimit: -1,
                    ..Default::default()
                }
            )
            .is_empty()
        );
    }

    #[test]
    fn the_outcome_says_what_was_not_carried_over() {
        let mut outcome = RestoreOutcome {
            kept_as: "shop_before_r1".into(),
            not_carried: Vec::new(),
        };
        assert_eq!(
            outcome.describe(),
            "previous database kept as shop_before_r1"
        );
        outcome
            .not_carried
            .push("SET work_mem for role app (ERROR: permission denied)".into());
        assert_eq!(
            outcome.describe(),
            "previous database kept as shop_before_r1; not carried over (still on shop_before_r1): SET work_mem for role app (ERROR: permission denied)"
        );
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("Weird \"Name\""), "\"Weird \"\"Name\"\"\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
    }

    #[test]
    fn counts_must_match_for_every_expected_table() {
        let got = counts(&[("public.a", 3), ("public.b", 0), ("s.extra", 9)]);
        assert!(check_counts(&counts(&[("public.a", 3), ("public.b", 0)]), &got).is_ok());
        match check_counts(&counts(&[("public.a", 4)]), &got) {
            Err(DbError::CountMismatch {
                table,
                expected: 4,
                got: 3,
            }) => assert_eq!(table, "public.a"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            check_counts(&counts(&[("public.gone", 0)]), &got),
            Err(DbError::MissingTable { expected: 0, .. })
        ));
    }

    #[test]
    fn row_count_lines_are_json() {
        let out = "[\"public\", \"users\", 500]\n[\"billing\", \"Weird \\\"Name\\\"\\n\", 3]\n\n";
        assert_eq!(
            parse_counts(out).unwrap(),
            counts(&[("public.users", 500), ("billing.Weird \"Name\"\n", 3)])
        );
        assert!(matches!(
            parse_counts("public|users|3"),
            Err(DbError::UnexpectedOutput { .. })
        ));
    }

    #[test]
    fn connection_args_only_what_is_set() {
        let mut t = coreutils();
        assert_eq!(connection_args(&t, None, "app"), ["-d", "app"]);
        t.host = Some("/run/postgresql".into());
        t.port = Some(5433);
        assert_eq!(
            connection_args(&t, Some("covet_app"), "postgres"),
            [
                "-h",
                "/run/postgresql",
                "-p",
                "5433",
                "-U",
                "covet_app",
                "-d",
                "postgres"
            ]
        );
    }

    #[test]
    fn roles() {
        let mut t = coreutils();
        t.user = Some("covet_app".into());
        assert_eq!(
            (t.data_role(), t.admin_role()),
            (Some("covet_app"), Some("covet_app"))
        );
        t.os_user = Some("postgres".into());
        assert_eq!(
            (t.data_role(), t.admin_role()),
            (Some("covet_app"), Some("postgres"))
        );
    }

    /// Runs `compress` like `dump` does, on `data`.
    fn compress_to(path: &Path, data: &[u8]) -> u64 {
        let file = File::create(path).unwrap();
        let (tx, rx) = mpsc::channel(PIPELINE_DEPTH);
        let compressor = std::thread::spawn(move || compress(file, rx));
        for chunk in data.chunks(CHUNK) {
            tx.blocking_send(chunk.to_vec()).unwrap();
        }
        drop(tx);
        compressor.join().unwrap().unwrap()
    }

    fn decompress_from(path: &Path) -> Result<Vec<u8>, DbError> {
        let file = File::open(path).unwrap();
        let (tx, mut rx) = mpsc::channel(PIPELINE_DEPTH);
        let owned = path.to_owned();
        let decompressor = std::thread::spawn(move || decompress(file, &owned, tx));
        let mut out = Vec::new();
        while let Some(chunk) = rx.blocking_recv() {
            out.extend_from_slice(&chunk);
        }
        decompressor.join().unwrap().map(|()| out)
    }

    #[test]
    fn zstd_round_trip_and_damage_detection() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.zst");
        let data: Vec<u8> = (0..3 * CHUNK as u32 + 17)
            .map(|i| (i % 251) as u8 ^ (i / 7919) as u8)
            .collect();
        let size = compress_to(&path, &data);
        assert_eq!(size, std::fs::metadata(&path).unwrap().len());
        assert!(size < data.len() as u64);
        assert_eq!(decompress_from(&path).unwrap(), data);

        let whole = std::fs::read(&path).unwrap();
        std::fs::write(&path, &whole[..whole.len() - 1]).unwrap();
        assert!(matches!(
            decompress_from(&path),
            Err(DbError::CorruptDump { .. })
        ));
        let mut flipped = whole.clone();
        let last = flipped.len() - 2;
        flipped[last] ^= 1; // inside the content checksum
        std::fs::write(&path, &flipped).unwrap();
        assert!(matches!(
            decompress_from(&path),
            Err(DbError::CorruptDump { .. })
        ));
    }

    #[test]
    fn an_unknown_os_user_is_named() {
        let mut t = coreutils();
        t.os_user = Some("no-such-user-covet".into());
        assert!(matches!(
            Program::new(&t, "psql"),
            Err(DbError::UnknownOsUser(name)) if name == "no-such-user-covet"
        ));
        t.os_user = Some("root".into());
        assert!(Program::new(&t, "psql").is_ok());
    }

    #[test]
    fn discovered_bindir_has_the_client_programs() {
        match PgTarget::discover_bindir() {
            Ok(dir) => assert!(has_client_programs(&dir), "{}", dir.display()),
            Err(e) => assert!(matches!(e, DbError::NoClientPrograms), "{e}"),
        }
    }

    #[test]
    fn a_relative_bindir_is_refused() {
        let mut t = coreutils();
        t.bindir = PathBuf::from("bin");
        assert!(matches!(
            Program::new(&t, "psql"),
            Err(DbError::RelativeBindir(_))
        ));
    }

    #[tokio::test]
    async fn failures_keep_stderr_and_timeouts_kill() {
        let t = coreutils();
        let ls = Program::new(&t, "ls")
            .unwrap()
            .with(|c| c.arg("/no/such/covet/path"));
        match run(ls, b"", Duration::from_secs(10)).await {
            Err(e @ DbError::Tool { .. }) => {
                let text = e.to_string();
                assert!(text.starts_with("ls failed (exit status: "), "{text}");
                assert!(text.contains("/no/such/covet/path"), "{text}");
            }
            other => panic!("{other:?}"),
        }

        let sleep = Program::new(&t, "sleep").unwrap().with(|c| c.arg("30"));
        let started = Instant::now();
        let late = run(sleep, b"", Duration::from_millis(200)).await;
        assert!(started.elapsed() < Duration::from_secs(5));
        match late {
            Err(e @ DbError::Timeout { .. }) => {
                assert_eq!(
                    e.to_string(),
                    "sleep did not finish within 200ms: it was killed"
                );
            }
            other => panic!("{other:?}"),
        }

        let missing = Program::new(&t, "no-such-covet-program").unwrap();
        assert!(matches!(
            run(missing, b"", Duration::from_secs(5)).await,
            Err(DbError::Spawn { .. })
        ));
    }

    #[tokio::test]
    async fn stdin_is_fed_and_stdout_returned() {
        let cat = Program::new(&coreutils(), "cat").unwrap();
        let out = run(cat, b"hello\n", Duration::from_secs(10)).await.unwrap();
        assert_eq!(out, "hello\n");
    }
}
