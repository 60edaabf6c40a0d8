//! Backups and restores of an app's SQLite database file, through the
//! system's libsqlite3 (`rusqlite`), every call on a blocking thread.
//!
//! # Dumps
//!
//! SQLite's online backup API copies the database in one step, under one
//! read transaction: a consistent snapshot while the app writes (in WAL
//! mode the writers go on; in rollback-journal mode they wait for the copy).
//! The copy goes to a private file beside the dump, is checked (`PRAGMA
//! integrity_check`), counted (the manifest's row counts are the copy's),
//! compressed with the same multi-threaded zstd as PostgreSQL's dumps, and
//! removed. The dump is a whole SQLite database file, compressed.
//!
//! # Restores
//!
//! With the app stopped (the workflow stops its unit first): the dump is
//! written beside the live file as `.{file}.restore-{id}`, checked, counted
//! against the manifest, given the live file's owner and mode, fsynced.
//! Then the live file's WAL is folded into it and its `-wal`/`-shm` files
//! removed, the live file is hard-linked as `{file}.before-{id}` (the kept
//! copy), and the restored file is renamed over the live one. The live path
//! always names a whole database: the old one until the rename, the
//! restored one after.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rusqlite::backup::{Backup, StepResult};
use rusqlite::{Connection, OpenFlags};

use super::{
    CHUNK, DbError, DumpStats, Dumped, Kind, RestoreOutcome, check_counts, create_private,
    finish_zstd, quote_ident, read_full, sync_parent, zstd_writer,
};

/// The first 16 bytes of every SQLite 3 database file.
const HEADER: &[u8; 16] = b"SQLite format 3\0";
/// Longest restore id: it ends up in file names.
const MAX_ID_LEN: usize = 64;
/// Pause between attempts while another connection holds a lock.
const BUSY_PAUSE: Duration = Duration::from_millis(50);

/// An app's SQLite database: the file its config declares.
#[derive(Debug, Clone)]
pub struct SqliteTarget {
    pub path: PathBuf,
}

/// The live file's name and directory, and the names one restore uses.
struct Names {
    dir: PathBuf,
    fresh: PathBuf,
    kept: PathBuf,
}

impl SqliteTarget {
    fn file_name(&self) -> Result<&str, DbError> {
        self.path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| DbError::NotSqlite {
                path: self.path.clone(),
                why: "the path does not end in a UTF-8 file name".into(),
            })
    }

    fn names(&self, restore_id: &str) -> Result<Names, DbError> {
        validate_id(restore_id)?;
        let name = self.file_name()?;
        let dir = match self.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        Ok(Names {
            fresh: dir.join(format!(".{name}.restore-{restore_id}")),
            kept: dir.join(format!("{name}.before-{restore_id}")),
            dir,
        })
    }

    /// Preflight: the file exists and is a SQLite database; its size and
    /// that of its WAL (what a copy needs at most).
    pub fn check(&self) -> Result<u64, DbError> {
        check_file(&self.path)?;
        let size = |p: &Path| fs::metadata(p).map_or(0, |m| m.len());
        Ok(size(&self.path) + size(&sidecar(&self.path, "-wal")))
    }
}

impl Kind for SqliteTarget {
    const FORMAT: &'static str = "sqlite+zstd";

    fn name(&self) -> String {
        self.path.display().to_string()
    }

    fn dump_description(&self) -> String {
        format!(
            "SQLite online backup of {} through zstd",
            self.path.display()
        )
    }

    async fn server_version(&self, _timeout: Duration) -> Result<String, DbError> {
        Ok(rusqlite::version().to_owned())
    }

    async fn dump(
        &self,
        dest: &Path,
        timeout: Duration,
        on_bytes: &(dyn Fn(u64) + Send + Sync),
        cancel: &AtomicBool,
    ) -> Result<Dumped, DbError> {
        let live = self.path.clone();
        let dest = dest.to_owned();
        // The blocking thread reports progress through a counter, and sees
        // the cancel flag through its own copy.
        let written = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (w, s) = (written.clone(), stop.clone());
        let mut task =
            tokio::task::spawn_blocking(move || dump_blocking(&live, &dest, timeout, &w, &s));
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                done = &mut task => {
                    on_bytes(written.load(Ordering::Relaxed));
                    return done.map_err(|e| DbError::io("SQLite dump task")(io::Error::other(e)))?;
                }
                _ = tick.tick() => {
                    on_bytes(written.load(Ordering::Relaxed));
                    if cancel.load(Ordering::Relaxed) {
                        stop.store(true, Ordering::Relaxed);
                    }
                }
            }
        }
    }

    async fn restore_swap_checked(
        &self,
        dump: &Path,
        restore_id: &str,
        expected: &BTreeMap<String, u64>,
        timeout: Duration,
    ) -> Result<RestoreOutcome, DbError> {
        let target = self.clone();
        let (dump, id, expected) = (dump.to_owned(), restore_id.to_owned(), expected.clone());
        tokio::task::spawn_blocking(move || {
            restore_blocking(&target, &dump, &id, &expected, timeout)
        })
        .await
        .map_err(|e| DbError::io("SQLite restore task")(io::Error::other(e)))?
    }

    /// The restore decompresses and checks the whole dump before it touches
    /// the live file, so there is no separate verification pass.
    async fn restore_swap(
        &self,
        dump: &Path,
        restore_id: &str,
        expected: &BTreeMap<String, u64>,
        timeout: Duration,
    ) -> Result<RestoreOutcome, DbError> {
        self.restore_swap_checked(dump, restore_id, expected, timeout)
            .await
    }

    async fn drop_kept(&self, kept: &str, _timeout: Duration) -> Result<(), DbError> {
        let name = self.file_name()?;
        let kept_path = Path::new(kept);
        let id = kept_path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix(name))
            .and_then(|rest| rest.strip_prefix(".before-"))
            .filter(|_| kept_path.parent() == self.path.parent())
            .ok_or_else(|| DbError::InvalidName {
                what: "kept database",
                name: kept.to_owned(),
                reason: format!(
                    "not of the form {}.before-<restore id>",
                    self.path.display()
                ),
            })?;
        validate_id(id)?;
        for path in [
            kept_path.to_owned(),
            sidecar(kept_path, "-wal"),
            sidecar(kept_path, "-shm"),
        ] {
            match fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(DbError::io(format!("remove {}", path.display()))(e));
                }
                _ => {}
            }
        }
        sync_parent(kept_path)
    }
}

/// Decompresses a dump to a private file in `scratch_dir`, checks it
/// (`PRAGMA integrity_check`) and its row counts against `expected`, and
/// removes it; the number of tables.
pub async fn verify_dump(
    dump: &Path,
    scratch_dir: &Path,
    expected: &BTreeMap<String, u64>,
) -> Result<usize, DbError> {
    let (dump, expected) = (dump.to_owned(), expected.clone());
    let copy = scratch_dir.join(format!(".verify-{}.sqlite", std::process::id()));
    tokio::task::spawn_blocking(move || {
        let result = (|| {
            let file = create_private(&copy, "create")?;
            decompress_into(&dump, file)?;
            let counts = checked_counts(&copy)?;
            check_counts(&expected, &counts)?;
            Ok(counts.len())
        })();
        remove_with_sidecars(&copy);
        result
    })
    .await
    .map_err(|e| DbError::io("SQLite verify task")(io::Error::other(e)))?
}

// ---------------------------------------------------------------------------
// Dump

fn dump_blocking(
    live: &Path,
    dest: &Path,
    timeout: Duration,
    written: &AtomicU64,
    stop: &AtomicBool,
) -> Result<Dumped, DbError> {
    check_file(live)?;
    let copy = dest.with_file_name(format!(
        ".{}.copy",
        dest.file_name().and_then(|n| n.to_str()).unwrap_or("dump")
    ));
    let result = (|| {
        let uncompressed_bytes = snapshot(live, &copy, timeout)?;
        let row_counts = checked_counts(&copy)?;
        if stop.load(Ordering::Relaxed) {
            return Err(DbError::Canceled);
        }
        let compressed_bytes = compress_file(&copy, dest, written, stop)?;
        Ok(Dumped {
            stats: DumpStats {
                uncompressed_bytes,
                compressed_bytes,
                stderr: String::new(),
            },
            row_counts,
        })
    })();
    remove_with_sidecars(&copy);
    if result.is_err() {
        // Ours since create_new: an incomplete dump must not pass for a backup.
        match fs::remove_file(dest) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                tracing::warn!("could not remove incomplete dump {}: {e}", dest.display());
            }
            _ => {}
        }
    }
    result
}

/// The online backup of `live` into the new file `copy`, in one step (one
/// read transaction, so one consistent snapshot); retried while a writer
/// holds a lock the step needs, up to `timeout`. The copy's size.
fn snapshot(live: &Path, copy: &Path, timeout: Duration) -> Result<u64, DbError> {
    let source = Connection::open_with_flags(
        live,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sqlite_error("open", live))?;
    source
        .busy_timeout(timeout)
        .map_err(sqlite_error("configure", live))?;
    drop(create_private(copy, "create")?);
    let mut dest = Connection::open(copy).map_err(sqlite_error("create", copy))?;
    let deadline = Instant::now() + timeout;
    {
        let backup = Backup::new(&source, &mut dest).map_err(sqlite_error("back up", live))?;
        loop {
            match backup.step(-1).map_err(sqlite_error("back up", live))? {
                StepResult::Done => break,
                // `More` cannot follow a step of all pages, but a copy that
                // was restarted by a write simply takes another step.
                StepResult::More | StepResult::Busy | StepResult::Locked
                    if Instant::now() < deadline =>
                {
                    std::thread::sleep(BUSY_PAUSE);
                }
                _ => {
                    return Err(DbError::Timeout {
                        program: format!("SQLite backup of {}", live.display()),
                        after: timeout,
                    });
                }
            }
        }
    }
    dest.close()
        .map_err(|(_, e)| sqlite_error("close", copy)(e))?;
    fs::metadata(copy)
        .map(|m| m.len())
        .map_err(DbError::io(format!("stat {}", copy.display())))
}

/// zstd of `from` into the new file `dest`, fsynced; the compressed size.
fn compress_file(
    from: &Path,
    dest: &Path,
    written: &AtomicU64,
    stop: &AtomicBool,
) -> Result<u64, DbError> {
    let io_error = |what: &str| DbError::io(format!("{what} {}", dest.display()));
    let mut input = File::open(from).map_err(DbError::io(format!("open {}", from.display())))?;
    let file = create_private(dest, "create dump file")?;
    let mut encoder = zstd_writer(file).map_err(io_error("compress into"))?;
    let mut chunk = vec![0; CHUNK];
    loop {
        if stop.load(Ordering::Relaxed) {
            return Err(DbError::Canceled);
        }
        let n = read_full(&mut input, &mut chunk)
            .map_err(DbError::io(format!("read {}", from.display())))?;
        if n == 0 {
            break;
        }
        encoder
            .write_all(&chunk[..n])
            .map_err(io_error("compress into"))?;
        written.fetch_add(n as u64, Ordering::Relaxed);
    }
    let size = finish_zstd(encoder).map_err(io_error("finish"))?;
    sync_parent(dest)?;
    Ok(size)
}

// ---------------------------------------------------------------------------
// Restore

fn restore_blocking(
    target: &SqliteTarget,
    dump: &Path,
    restore_id: &str,
    expected: &BTreeMap<String, u64>,
    timeout: Duration,
) -> Result<RestoreOutcome, DbError> {
    let names = target.names(restore_id)?;
    let live = &target.path;
    let outcome = RestoreOutcome {
        kept_as: names.kept.display().to_string(),
        not_carried: Vec::new(),
    };
    // The kept file exists only once this restore's checked copy was
    // complete: run again after a crash, finish the rename (if it had not
    // happened yet) and stop.
    if names.kept.exists() {
        if names.fresh.exists() {
            rename_into_place(&names.fresh, live)?;
        }
        tracing::info!(
            "{} was already restored as {} was kept",
            live.display(),
            outcome.kept_as
        );
        return Ok(outcome);
    }
    let live_meta = check_file(live)?;
    remove_with_sidecars(&names.fresh);
    let needed = live_meta.len();
    let available = free_bytes(&names.dir)?;
    if available < needed {
        return Err(DbError::NoSpace {
            dir: names.dir.clone(),
            needed,
            available,
        });
    }
    let prepared = (|| {
        let file = create_private(&names.fresh, "create")?;
        // The app's user must be able to open its database as before.
        std::os::unix::fs::fchown(&file, Some(live_meta.uid()), Some(live_meta.gid()))
            .map_err(DbError::io(format!("chown {}", names.fresh.display())))?;
        file.set_permissions(fs::Permissions::from_mode(live_meta.mode() & 0o7777))
            .map_err(DbError::io(format!("chmod {}", names.fresh.display())))?;
        decompress_into(dump, file)?;
        check_counts(expected, &checked_counts(&names.fresh)?)?;
        // Opening it for the checks may have made sidecars for its own name.
        remove_sidecars(&names.fresh)?;
        sync_parent(&names.fresh)
    })();
    if let Err(e) = prepared {
        remove_with_sidecars(&names.fresh);
        return Err(e);
    }
    if let Err(e) = retire_live_journal(live, timeout) {
        remove_with_sidecars(&names.fresh);
        return Err(e);
    }
    fs::hard_link(live, &names.kept).map_err(DbError::io(format!(
        "keep {} as {}",
        live.display(),
        names.kept.display()
    )))?;
    sync_parent(&names.kept)?;
    rename_into_place(&names.fresh, live)?;
    Ok(outcome)
}

/// Folds the live file's WAL into it and removes its `-wal`, `-journal` and
/// `-shm` files, so that the restored file, once renamed into place, never
/// meets a journal that belongs to the old one (SQLite would replay a stale
/// WAL onto it). This happens before the rename, while those files still
/// belong to the live file and after its content is all in the main file:
/// removing them loses nothing. Order: `-wal` (and `-journal`) first, then
/// `-shm`; a crash in between leaves only an index without its log, which
/// SQLite rebuilds, never a log without the index of the file it belongs to.
fn retire_live_journal(live: &Path, timeout: Duration) -> Result<(), DbError> {
    let conn = Connection::open(live).map_err(sqlite_error("open", live))?;
    conn.busy_timeout(timeout)
        .map_err(sqlite_error("configure", live))?;
    // Reading replays a hot rollback journal; the checkpoint empties a WAL.
    conn.query_row("SELECT count(*) FROM sqlite_schema", [], |r| {
        r.get::<_, i64>(0)
    })
    .map_err(sqlite_error("read", live))?;
    let busy: i64 = conn
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))
        .map_err(sqlite_error("checkpoint", live))?;
    if busy != 0 {
        return Err(DbError::NotSqlite {
            path: live.to_owned(),
            why: "another process still uses it (the WAL checkpoint was blocked); stop the app"
                .into(),
        });
    }
    conn.close()
        .map_err(|(_, e)| sqlite_error("close", live)(e))?;
    let file = File::open(live).map_err(DbError::io(format!("open {}", live.display())))?;
    file.sync_all()
        .map_err(DbError::io(format!("fsync {}", live.display())))?;
    remove_sidecars(live)
}

/// rename(2) of the checked copy over the live path, made durable.
fn rename_into_place(fresh: &Path, live: &Path) -> Result<(), DbError> {
    fs::rename(fresh, live).map_err(DbError::io(format!(
        "rename {} over {}",
        fresh.display(),
        live.display()
    )))?;
    sync_parent(live)
}

fn remove_sidecars(path: &Path) -> Result<(), DbError> {
    for suffix in ["-wal", "-journal", "-shm"] {
        let file = sidecar(path, suffix);
        match fs::remove_file(&file) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(DbError::io(format!("remove {}", file.display()))(e));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Best effort: scratch files of ours.
fn remove_with_sidecars(path: &Path) {
    for file in [
        path.to_owned(),
        sidecar(path, "-wal"),
        sidecar(path, "-journal"),
        sidecar(path, "-shm"),
    ] {
        match fs::remove_file(&file) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                tracing::warn!("could not remove {}: {e}", file.display());
            }
            _ => {}
        }
    }
}

// ---------------------------------------------------------------------------
// Files and checks

/// `path` + `suffix` (`db.sqlite-wal`).
fn sidecar(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// The file exists, is a regular file and starts with SQLite's header.
fn check_file(path: &Path) -> Result<fs::Metadata, DbError> {
    let meta = match fs::metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(DbError::NoSuchFile(path.to_owned()));
        }
        other => other.map_err(DbError::io(format!("stat {}", path.display())))?,
    };
    let not = |why: String| DbError::NotSqlite {
        path: path.to_owned(),
        why,
    };
    if !meta.is_file() {
        return Err(not("it is not a regular file".into()));
    }
    let mut header = [0u8; 16];
    let n = File::open(path)
        .and_then(|mut f| read_full(&mut f, &mut header))
        .map_err(DbError::io(format!("read {}", path.display())))?;
    if n < header.len() || &header != HEADER {
        return Err(not(format!(
            "its first bytes are not {:?} ({} bytes long)",
            "SQLite format 3",
            meta.len()
        )));
    }
    Ok(meta)
}

fn validate_id(id: &str) -> Result<(), DbError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(DbError::InvalidName {
            what: "restore id",
            name: id.to_owned(),
            reason: format!("use 1 to {MAX_ID_LEN} letters, digits, `_` and `-`"),
        })
    }
}

/// Writes the decompressed dump into `file`, fsynced.
fn decompress_into(dump: &Path, mut file: File) -> Result<(), DbError> {
    let corrupt = |source| DbError::CorruptDump {
        path: dump.to_owned(),
        source,
    };
    let input = File::open(dump).map_err(DbError::io(format!("open {}", dump.display())))?;
    let mut decoder = zstd::Decoder::new(input).map_err(corrupt)?;
    let mut chunk = vec![0; CHUNK];
    loop {
        let n = match read_full(&mut decoder, &mut chunk) {
            Ok(n) => n,
            Err(e) => return Err(corrupt(e)),
        };
        if n == 0 {
            break;
        }
        file.write_all(&chunk[..n])
            .map_err(DbError::io("write the restored database"))?;
    }
    file.sync_all()
        .map_err(DbError::io("fsync the restored database"))
}

/// `PRAGMA integrity_check` of a file of ours, then its row counts.
fn checked_counts(path: &Path) -> Result<BTreeMap<String, u64>, DbError> {
    check_file(path)?;
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sqlite_error("open", path))?;
    let report = integrity_report(&conn).map_err(sqlite_error("check", path))?;
    if report != ["ok"] {
        return Err(DbError::Integrity {
            path: path.to_owned(),
            report: report.join("; "),
        });
    }
    let counts = table_counts(&conn).map_err(sqlite_error("count rows of", path))?;
    conn.close()
        .map_err(|(_, e)| sqlite_error("close", path)(e))?;
    Ok(counts)
}

fn integrity_report(conn: &Connection) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare("PRAGMA integrity_check")?;
    let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
    rows.collect()
}

/// Exact row counts of every table but SQLite's own, keyed "main.TABLE",
/// in one read transaction.
fn table_counts(conn: &Connection) -> rusqlite::Result<BTreeMap<String, u64>> {
    conn.execute_batch("BEGIN")?;
    let tables: Vec<String> = {
        let mut stmt = conn.prepare(
            "SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY name",
        )?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    let mut counts = BTreeMap::new();
    for table in tables {
        let sql = format!("SELECT count(*) FROM {}", quote_ident(&table));
        let n: i64 = conn.query_row(&sql, [], |r| r.get(0))?;
        counts.insert(format!("main.{table}"), u64::try_from(n).unwrap_or(0));
    }
    conn.execute_batch("COMMIT")?;
    Ok(counts)
}

fn free_bytes(dir: &Path) -> Result<u64, DbError> {
    crate::files::free_bytes(dir).map_err(DbError::io(format!("statvfs {}", dir.display())))
}

fn sqlite_error(context: &'static str, path: &Path) -> impl FnOnce(rusqlite::Error) -> DbError {
    let path = path.to_owned();
    move |source| DbError::Sqlite {
        context,
        path,
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db_with(dir: &Path, name: &str, rows: i64) -> PathBuf {
        let path = dir.join(name);
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT); \
             CREATE TABLE \"odd \"\"name\" (x);",
        )
        .unwrap();
        for i in 0..rows {
            conn.execute("INSERT INTO t (v) VALUES (?1)", [format!("row {i}")])
                .unwrap();
        }
        path
    }

    #[test]
    fn header_check_names_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.db");
        assert!(matches!(check_file(&missing), Err(DbError::NoSuchFile(p)) if p == missing));
        let text = dir.path().join("text.db");
        fs::write(&text, "hello, not a database at all").unwrap();
        let err = check_file(&text).unwrap_err().to_string();
        assert!(err.contains("is not a SQLite database"), "{err}");
        assert!(matches!(
            check_file(dir.path()),
            Err(DbError::NotSqlite { .. })
        ));
        let real = db_with(dir.path(), "real.db", 1);
        assert!(check_file(&real).is_ok());
    }

    #[test]
    fn counts_every_table_with_quoted_names() {
        let dir = tempfile::tempdir().unwrap();
        let path = db_with(dir.path(), "c.db", 5);
        let counts = checked_counts(&path).unwrap();
        assert_eq!(counts.get("main.t"), Some(&5));
        assert_eq!(counts.get("main.odd \"name"), Some(&0));
        assert_eq!(counts.len(), 2);
    }

    #[test]
    fn restore_ids_and_kept_names_are_checked() {
        for bad in ["", "../x", "a b", "x/y", &"a".repeat(65)] {
            assert!(validate_id(bad).is_err(), "{bad:?}");
        }
        assert!(validate_id("r1-x_2").is_ok());
        let t = SqliteTarget {
            path: PathBuf::from("/srv/app/app.db"),
        };
        let names = t.names("r1").unwrap();
        assert_eq!(names.kept, Path::new("/srv/app/app.db.before-r1"));
        assert_eq!(names.fresh, Path::new("/srv/app/.app.db.restore-r1"));
        assert_eq!(sidecar(&t.path, "-wal"), Path::new("/srv/app/app.db-wal"));
    }

    #[tokio::test]
    async fn drop_kept_refuses_other_files() {
        let t = SqliteTarget {
            path: PathBuf::from("/srv/app/app.db"),
        };
        for bad in [
            "/srv/app/app.db",
            "/srv/other/app.db.before-r1",
            "/srv/app/app.db.before-../../etc/passwd",
            "/srv/app/other.db.before-r1",
        ] {
            assert!(
                matches!(
                    t.drop_kept(bad, Duration::from_secs(1)).await,
                    Err(DbError::InvalidName { .. })
                ),
                "{bad}"
            );
        }
    }

    #[tokio::test]
    async fn dump_restore_round_trip_keeps_the_previous_file() {
        let dir = tempfile::tempdir().unwrap();
        let live = db_with(dir.path(), "app.db", 3);
        let t = SqliteTarget { path: live.clone() };
        let dump = dir.path().join("database.dump.zst");
        let never = AtomicBool::new(false);
        let dumped = Kind::dump(&t, &dump, Duration::from_secs(10), &|_| {}, &never)
            .await
            .unwrap();
        assert_eq!(dumped.row_counts.get("main.t"), Some(&3));
        assert_eq!(
            verify_dump(&dump, dir.path(), &dumped.row_counts)
                .await
                .unwrap(),
            2
        );
        Connection::open(&live)
            .unwrap()
            .execute("DELETE FROM t", [])
            .unwrap();
        let outcome = t
            .restore_swap(&dump, "r1", &dumped.row_counts, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(checked_counts(&live).unwrap().get("main.t"), Some(&3));
        let kept = PathBuf::from(&outcome.kept_as);
        assert_eq!(checked_counts(&kept).unwrap().get("main.t"), Some(&0));
        // Again with the same id: done, nothing changes.
        let again = t
            .restore_swap(&dump, "r1", &dumped.row_counts, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(again, outcome);
        t.drop_kept(&outcome.kept_as, Duration::from_secs(1))
            .await
            .unwrap();
        assert!(!kept.exists());
        t.drop_kept(&outcome.kept_as, Duration::from_secs(1))
            .await
            .unwrap();
    }
}
