//! Backups of an app: one archive per declared path and a database dump,
//! described by a manifest of checksums, published only when complete.
//!
//! Layout: `backup_dir/APP/ID/{manifest.json, NN-NAME.tar.zst, database.dump.zst}`.
//! A backup is written under `backup_dir/APP/.ID.partial`, fsynced, then
//! renamed into place: anything without a readable manifest under its final
//! name is not a backup.

pub(crate) mod download;
pub(crate) mod jobs;
pub(crate) mod references;

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use crate::archive::{self, ArchiveError, Compression, Progress};
use crate::config::{AppConfig, RetentionConfig};
use crate::db::{self, Database, PgTarget};
use crate::files::safe::{Dir, Staging};
use crate::files::{free_bytes, fsync_dir};
use crate::ops::OpContext;
use std::ffi::OsString;

pub const MANIFEST: &str = "manifest.json";
pub const DUMP_FILE: &str = "database.dump.zst";
const DB_TIMEOUT: Duration = Duration::from_secs(6 * 3600);
const QUERY_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the parts of a backup running at once look at the cancel flag.
const CANCEL_POLL: Duration = Duration::from_millis(100);
/// Least time between two progress reports of a backup.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("no backup {0} on this host")]
    NotFound(String),
    #[error("{0:?} is not a backup id")]
    InvalidId(String),
    #[error(
        "not enough space on {disk}: the backup needs up to {needed} bytes, {free} are free and {reserve} must stay free"
    )]
    NoSpace {
        disk: String,
        needed: u64,
        free: u64,
        reserve: u64,
    },
    #[error("backup {id} is damaged: {why}")]
    Corrupt { id: String, why: String },
    #[error("{0}")]
    Archive(#[from] ArchiveError),
    #[error("{0}")]
    Db(#[from] db::DbError),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Refused(String),
    #[error("canceled")]
    Canceled,
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> BackupError + 'a {
    move |source| BackupError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestFile {
    /// File name within the backup directory.
    pub name: String,
    /// The declared path it archives; empty for the database dump.
    pub source_path: String,
    pub size: u64,
    pub sha256: String,
    /// Bytes of file contents the archive holds (its extraction budget);
    /// 0 in manifests of older agents, whose archives are measured instead.
    #[serde(default)]
    pub content_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestDb {
    pub dbname: String,
    pub server_version: String,
    /// `pg_dump-custom+zstd`: `pg_dump -Fc -Z0` through multi-threaded zstd.
    pub format: String,
    pub row_counts: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub id: String,
    pub app: String,
    /// RFC 3339, UTC.
    pub created: String,
    /// Milliseconds since the epoch: orders backups made within one second.
    pub created_unix_ms: i64,
    pub agent_version: String,
    pub package_version: String,
    pub compression: String,
    pub files: Vec<ManifestFile>,
    pub database: Option<ManifestDb>,
    pub total_bytes: u64,
}

impl Manifest {
    pub fn created_time(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH
            + Duration::from_millis(u64::try_from(self.created_unix_ms).unwrap_or(0))
    }
}

/// What to back up.
#[derive(Debug, Clone, Copy)]
pub struct CreateOptions {
    pub files: bool,
    pub database: bool,
    pub compression: Compression,
}

/// What to restore.
#[derive(Debug, Clone, Copy)]
pub struct RestoreOptions {
    pub files: bool,
    pub database: bool,
}

/// Backup ids name directories: letters, digits, `-`, `_`, `.`, not leading `.`.
pub fn validate_id(id: &str) -> Result<(), BackupError> {
    crate::names::BackupId::parse(id)
        .map(|_| ())
        .map_err(|_| BackupError::InvalidId(id.to_owned()))
}

/// The database of an app as the db module needs it.
pub fn db_target(app: &AppConfig) -> Result<Option<Database>, BackupError> {
    let Some(d) = &app.database else {
        return Ok(None);
    };
    Ok(Some(Database::from_config(d)?))
}

/// The checks of the app's database that need its server (see
/// [`Database::preflight`]): before a backup or an upgrade is accepted.
pub async fn check_database(app: &AppConfig) -> Result<(), BackupError> {
    if let Some(db) = db_target(app)? {
        db.preflight(QUERY_TIMEOUT)
            .await
            .map_err(|e| BackupError::Refused(e.to_string()))?;
    }
    Ok(())
}

/// A dump restores only into a database of the kind that made it.
pub fn check_dump_kind(dbm: &ManifestDb, db: &Database) -> Result<(), BackupError> {
    if dbm.format == db.format() {
        return Ok(());
    }
    Err(BackupError::Refused(format!(
        "the backup's database dump is {:?} but the app's database {} takes {:?}: restore it into a database of the kind that made it",
        dbm.format,
        db.name(),
        db.format()
    )))
}

/// The backups of this host.
#[derive(Debug, Clone)]
pub struct BackupStore {
    root: PathBuf,
}

impl BackupStore {
    pub fn new(root: PathBuf) -> BackupStore {
        BackupStore { root }
    }

    fn app_dir(&self, app: &str) -> PathBuf {
        self.root.join(app)
    }

    /// Valid backups of the given apps, newest first.
    pub fn list(&self, apps: &[&str]) -> Vec<Manifest> {
        let mut out = Vec::new();
        for app in apps {
            let Ok(entries) = std::fs::read_dir(self.app_dir(app)) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') {
                    continue;
                }
                if let Ok(m) = read_manifest(&entry.path())
                    && m.id == name
                    && m.app == *app
                {
                    out.push(m);
                }
            }
        }
        out.sort_by(|a, b| {
            b.created_unix_ms
                .cmp(&a.created_unix_ms)
                .then(b.id.cmp(&a.id))
        });
        out
    }

    /// A backup by id, searched among the given apps' directories only.
    pub fn find(&self, apps: &[&str], id: &str) -> Result<(PathBuf, Manifest), BackupError> {
        validate_id(id)?;
        for app in apps {
            let dir = self.app_dir(app).join(id);
            if let Ok(m) = read_manifest(&dir)
                && m.id == id
            {
                return Ok((dir, m));
            }
        }
        Err(BackupError::NotFound(id.to_owned()))
    }

    /// Refuses a backup that would leave less than `reserve` bytes free.
    /// Returns the estimated size (uncompressed: an upper bound).
    pub fn preflight(
        &self,
        app: &AppConfig,
        opts: CreateOptions,
        reserve: u64,
    ) -> Result<u64, BackupError> {
        let mut needed = 0u64;
        if opts.files {
            for path in &paths_of(app) {
                needed += archive::measure(path)?.uncompressed_bytes;
            }
        }
        if opts.database {
            // A SQLite dump copies the file beside the dump first.
            if let Some(crate::config::DatabaseConfig::Sqlite(lite)) = &app.database {
                let target = db::SqliteTarget {
                    path: lite.path.clone(),
                };
                needed += target
                    .check()
                    .map_err(|e| BackupError::Refused(e.to_string()))?;
            }
            // The last dump of this app is the best guess of the next one.
            needed += self
                .list(&[app.name.as_str()])
                .iter()
                .find_map(|m| {
                    m.files
                        .iter()
                        .find(|f| f.name == DUMP_FILE)
                        .map(|f| f.size * 2)
                })
                .unwrap_or(64 << 20);
        }
        let dir = self.app_dir(&app.name);
        crate::files::private::create_dir_all(&dir).map_err(io("cannot create", &dir))?;
        let free = free_bytes(&dir).map_err(io("cannot stat", &dir))?;
        if free < needed.saturating_add(reserve) {
            return Err(BackupError::NoSpace {
                disk: dir.display().to_string(),
                needed,
                free,
                reserve,
            });
        }
        Ok(needed)
    }

    /// Writes a complete backup; on any failure nothing valid is left behind.
    pub async fn create(
        &self,
        ctx: &OpContext,
        app: &AppConfig,
        opts: CreateOptions,
        estimate: u64,
    ) -> Result<Manifest, BackupError> {
        let id = crate::ops::log::new_id(&app.name);
        let app_dir = self.app_dir(&app.name);
        let partial = app_dir.join(format!(".{id}.partial"));
        crate::files::private::create_dir_all(&partial).map_err(io("cannot create", &partial))?;
        let result = self.fill(ctx, app, opts, estimate, &id, &partial).await;
        match result {
            Ok(manifest) => {
                let final_dir = app_dir.join(&id);
                std::fs::rename(&partial, &final_dir).map_err(io("cannot publish", &final_dir))?;
                fsync_dir(&app_dir).map_err(io("cannot sync", &app_dir))?;
                Ok(manifest)
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&partial);
                Err(e)
            }
        }
    }

    async fn fill(
        &self,
        ctx: &OpContext,
        app: &AppConfig,
        opts: CreateOptions,
        estimate: u64,
        id: &str,
        dir: &Path,
    ) -> Result<Manifest, BackupError> {
        let created = time::OffsetDateTime::now_utc();
        let mut manifest = Manifest {
            id: id.to_owned(),
            app: app.name.clone(),
            created: created
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
            created_unix_ms: i64::try_from(created.unix_timestamp_nanos() / 1_000_000).unwrap_or(0),
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            package_version: crate::deploy::serving_version(app)
                .await
                .unwrap_or_default(),
            compression: opts.compression.as_str().to_owned(),
            files: Vec::new(),
            database: None,
            total_bytes: 0,
        };
        let progress = Arc::new(BackupProgress::new(ctx, estimate));
        // One flag stops both parts: the operation's cancel or the first failure.
        let stop = Arc::new(AtomicBool::new(false));
        let pg = if opts.database { db_target(app)? } else { None };
        let files = async {
            if opts.files {
                self.archive_paths(ctx, app, opts.compression, dir, &progress, &stop)
                    .await
            } else {
                Ok(Vec::new())
            }
        };
        let database = async {
            match &pg {
                Some(pg) => self
                    .dump_step(ctx, pg, dir, &progress, &stop)
                    .await
                    .map(Some),
                None => Ok(None),
            }
        };
        let (files, database) = run_both(&ctx.cancel_flag(), &stop, files, database).await?;
        manifest.files = files;
        if let Some((file, db)) = database {
            manifest.files.push(file);
            manifest.database = Some(db);
        }
        manifest.total_bytes = manifest.files.iter().map(|f| f.size).sum();
        let path = dir.join(MANIFEST);
        let bytes = serde_json::to_vec_pretty(&manifest)
            .map_err(|e| BackupError::Refused(e.to_string()))?;
        crate::files::private::write_synced(&path, &bytes).map_err(io("cannot write", &path))?;
        fsync_dir(dir).map_err(io("cannot sync", dir))?;
        Ok(manifest)
    }

    /// Archives every declared path, one after the other, into `dir`;
    /// stops between and within archives once `stop` is set.
    async fn archive_paths(
        &self,
        ctx: &OpContext,
        app: &AppConfig,
        compression: Compression,
        dir: &Path,
        progress: &Arc<BackupProgress>,
        stop: &Arc<AtomicBool>,
    ) -> Result<Vec<ManifestFile>, BackupError> {
        let mut files = Vec::new();
        for (i, path) in paths_of(app).iter().enumerate() {
            if stop.load(Ordering::Relaxed) {
                return Err(BackupError::Canceled);
            }
            let base = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "root".to_owned());
            let name = format!("{i:02}-{base}.{}", compression.extension());
            let step = format!("archive {}", path.display());
            ctx.step_started(
                &step,
                format!("tar + {} of {}", compression.as_str(), path.display()),
            );
            let dest = dir.join(&name);
            let archived = run_archive(
                path.clone(),
                dest.clone(),
                compression,
                progress.part(&step),
                stop.clone(),
            )
            .await;
            let stats = match archived {
                Ok(s) => s,
                Err(e) => {
                    let detail = failure_detail(ctx, &e, "the database dump failed");
                    ctx.step_finished(&step, crate::ops::log::StepOutcome::Failed, detail);
                    return Err(e);
                }
            };
            let sha256 = sha256_file(&dest).await?;
            ctx.step_finished(
                &step,
                crate::ops::log::StepOutcome::Succeeded,
                format!(
                    "{} files, {} bytes -> {} bytes",
                    stats.files, stats.uncompressed_bytes, stats.compressed_bytes
                ),
            );
            files.push(ManifestFile {
                name,
                source_path: path.display().to_string(),
                size: stats.compressed_bytes,
                sha256,
                content_bytes: stats.uncompressed_bytes,
            });
        }
        Ok(files)
    }

    /// The "dump database" step: [`BackupStore::dump`], journaled.
    async fn dump_step(
        &self,
        ctx: &OpContext,
        pg: &Database,
        dir: &Path,
        progress: &Arc<BackupProgress>,
        stop: &Arc<AtomicBool>,
    ) -> Result<(ManifestFile, ManifestDb), BackupError> {
        let step = "dump database";
        ctx.step_started(step, pg.dump_description());
        match self.dump(ctx, step, pg, dir, progress, stop).await {
            Ok((file, db)) => {
                ctx.step_finished(
                    step,
                    crate::ops::log::StepOutcome::Succeeded,
                    format!("{} tables, {} bytes", db.row_counts.len(), file.size),
                );
                Ok((file, db))
            }
            Err(e) => {
                let detail = failure_detail(ctx, &e, "archiving the files failed");
                ctx.step_finished(step, crate::ops::log::StepOutcome::Failed, detail);
                Err(e)
            }
        }
    }

    async fn dump(
        &self,
        ctx: &OpContext,
        step: &str,
        pg: &Database,
        dir: &Path,
        progress: &Arc<BackupProgress>,
        stop: &AtomicBool,
    ) -> Result<(ManifestFile, ManifestDb), BackupError> {
        let server_version = ctx.waiting(pg.server_version(QUERY_TIMEOUT)).await?;
        if stop.load(Ordering::Relaxed) {
            return Err(BackupError::Canceled);
        }
        let dest = dir.join(DUMP_FILE);
        let on_bytes = progress.part(step);
        let db::Dumped { stats, row_counts } = ctx
            .waiting(pg.dump(&dest, DB_TIMEOUT, &on_bytes, stop))
            .await?;
        for line in stats.stderr.lines().filter(|l| !l.trim().is_empty()) {
            ctx.output(step, crate::ops::log::OutputStream::Stderr, line);
        }
        let sha256 = sha256_file(&dest).await?;
        Ok((
            ManifestFile {
                name: DUMP_FILE.to_owned(),
                source_path: String::new(),
                size: stats.compressed_bytes,
                sha256,
                content_bytes: 0,
            },
            ManifestDb {
                dbname: pg.name(),
                server_version,
                format: pg.format().to_owned(),
                row_counts,
            },
        ))
    }

    /// Recomputes checksums, test-reads every archive, lists the dump.
    pub async fn verify(
        &self,
        ctx: &OpContext,
        dir: &Path,
        manifest: &Manifest,
        pg: Option<&Database>,
    ) -> Result<(), BackupError> {
        self.check_sums(ctx, dir, manifest).await?;
        let compression = Compression::parse(&manifest.compression).unwrap_or(Compression::Zstd);
        for file in manifest.files.iter().filter(|f| !f.source_path.is_empty()) {
            let step = format!("test-read {}", file.name);
            ctx.step_started(&step, "decompress and read every entry");
            let path = dir.join(&file.name);
            let cancel = ctx.cancel_flag();
            let result = tokio::task::spawn_blocking(move || {
                let progress = Progress {
                    on_bytes: &|_| {},
                    cancel: &cancel,
                };
                archive::test_read(&path, compression, &progress)
            })
            .await
            .map_err(|e| BackupError::Refused(format!("verify task failed: {e}")))?;
            finish_step(
                ctx,
                &step,
                result.as_ref().map(|s| format!("{} entries", s.files)),
            )?;
            result.map_err(|e| BackupError::Corrupt {
                id: manifest.id.clone(),
                why: e.to_string(),
            })?;
        }
        if let Some(dbm) = manifest
            .database
            .as_ref()
            .filter(|d| d.format == <db::SqliteTarget as db::Kind>::FORMAT)
        {
            let step = "check dump";
            ctx.step_started(step, "decompress, PRAGMA integrity_check, row counts");
            let result = db::sqlite::verify_dump(&dir.join(DUMP_FILE), dir, &dbm.row_counts).await;
            finish_step(
                ctx,
                step,
                result.as_ref().map(|tables| format!("{tables} tables")),
            )?;
            result.map_err(|e| BackupError::Corrupt {
                id: manifest.id.clone(),
                why: e.to_string(),
            })?;
        } else if let Some(dbm) = manifest
            .database
            .as_ref()
            .filter(|d| d.format == <db::MysqlTarget as db::Kind>::FORMAT)
        {
            let step = "check dump";
            ctx.step_started(step, "decompress, count the rows of every table");
            let result = db::mysql::verify_dump(&dir.join(DUMP_FILE), &dbm.row_counts).await;
            finish_step(
                ctx,
                step,
                result.as_ref().map(|tables| format!("{tables} tables")),
            )?;
            result.map_err(|e| BackupError::Corrupt {
                id: manifest.id.clone(),
                why: e.to_string(),
            })?;
        } else if manifest.database.is_some() {
            let step = "list dump";
            ctx.step_started(step, "pg_restore --list");
            let bindir = match pg {
                Some(Database::Postgres(pg)) => pg.clone(),
                _ => PgTarget {
                    dbname: String::new(),
                    host: None,
                    port: None,
                    user: None,
                    os_user: None,
                    bindir: PgTarget::discover_bindir()?,
                },
            };
            let result = db::list_dump(&bindir, &dir.join(DUMP_FILE), QUERY_TIMEOUT).await;
            finish_step(
                ctx,
                step,
                result
                    .as_ref()
                    .map(|toc| format!("{} TOC entries", toc.len())),
            )?;
            result.map_err(|e| BackupError::Corrupt {
                id: manifest.id.clone(),
                why: e.to_string(),
            })?;
        }
        Ok(())
    }

    /// Compares every file's SHA-256 with the manifest, without reporting.
    pub async fn verify_checksums(dir: &Path, manifest: &Manifest) -> Result<(), BackupError> {
        for file in &manifest.files {
            let path = dir.join(&file.name);
            let why = match sha256_file(&path).await {
                Ok(sum) if sum == file.sha256 => continue,
                Ok(_) => format!("{} does not match its checksum", file.name),
                Err(e) => format!("{} cannot be read: {e}", file.name),
            };
            return Err(BackupError::Corrupt {
                id: manifest.id.clone(),
                why,
            });
        }
        Ok(())
    }

    /// Compares every file's SHA-256 with the manifest.
    pub async fn check_sums(
        &self,
        ctx: &OpContext,
        dir: &Path,
        manifest: &Manifest,
    ) -> Result<(), BackupError> {
        let step = "checksums";
        ctx.step_started(step, "SHA-256 of every file against the manifest");
        for file in &manifest.files {
            let path = dir.join(&file.name);
            let actual = sha256_file(&path).await;
            let why = match actual {
                Ok(sum) if sum == file.sha256 => continue,
                Ok(_) => format!("{} does not match its checksum", file.name),
                Err(e) => format!("{} cannot be read: {e}", file.name),
            };
            ctx.step_finished(step, crate::ops::log::StepOutcome::Failed, why.clone());
            return Err(BackupError::Corrupt {
                id: manifest.id.clone(),
                why,
            });
        }
        ctx.step_finished(
            step,
            crate::ops::log::StepOutcome::Succeeded,
            format!("{} files", manifest.files.len()),
        );
        Ok(())
    }

    /// Deletes a backup; returns the bytes freed.
    pub fn delete(&self, dir: &Path, manifest: &Manifest) -> Result<u64, BackupError> {
        // Rename first so a half-deleted backup never looks valid.
        let doomed = dir.with_file_name(format!(".{}.deleting", manifest.id));
        std::fs::rename(dir, &doomed).map_err(io("cannot delete", dir))?;
        std::fs::remove_dir_all(&doomed).map_err(io("cannot delete", &doomed))?;
        Ok(manifest.total_bytes)
    }

    /// Applies retention: deletes what `keep_last` and `keep_days` let go,
    /// never the newest backup nor one in `referenced`. Returns the deleted ids.
    pub fn prune(
        &self,
        app: &str,
        retention: &RetentionConfig,
        referenced: &HashSet<String>,
    ) -> Result<Vec<String>, BackupError> {
        let backups = self.list(&[app]);
        let now = SystemTime::now();
        let mut deleted = Vec::new();
        for (index, m) in backups.iter().enumerate() {
            let age = now.duration_since(m.created_time()).unwrap_or_default();
            let kept_by_count = retention.keep_last.is_some_and(|n| index < n as usize);
            let kept_by_age = retention
                .keep_days
                .is_some_and(|d| age < Duration::from_secs(u64::from(d) * 86400));
            let no_policy = retention.keep_last.is_none() && retention.keep_days.is_none();
            if index == 0 || kept_by_count || kept_by_age || no_policy || referenced.contains(&m.id)
            {
                continue;
            }
            let dir = self.app_dir(app).join(&m.id);
            self.delete(&dir, m)?;
            deleted.push(m.id.clone());
        }
        Ok(deleted)
    }

    /// Removes partial backups left by an interrupted agent.
    pub fn sweep_partial(&self, apps: &[&str]) {
        for app in apps {
            let Ok(entries) = std::fs::read_dir(self.app_dir(app)) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with('.')
                    && (name.ends_with(".partial") || name.ends_with(".deleting"))
                {
                    tracing::warn!(path = %entry.path().display(), "removing an interrupted backup");
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
    }

    /// Restores files (staged next to each target, swapped in by rename) and
    /// the database (restored into a new database, then swapped by name).
    /// A failure puts back every path already swapped; the live database is
    /// never half-restored.
    pub async fn restore(
        &self,
        ctx: &OpContext,
        app: &AppConfig,
        dir: &Path,
        manifest: &Manifest,
        opts: RestoreOptions,
    ) -> Result<RestoreReport, BackupError> {
        // The caller verified the checksums before accepting the restore.
        let rid = ctx.id.rsplit('-').next().unwrap_or("x").to_owned();
        let compression = Compression::parse(&manifest.compression).unwrap_or(Compression::Zstd);
        let mut swapped: Vec<SwappedPath> = Vec::new();
        let mut report = RestoreReport::default();
        if opts.files {
            for file in manifest.files.iter().filter(|f| !f.source_path.is_empty()) {
                let target = PathBuf::from(&file.source_path);
                // Only paths the app still declares may be written.
                if !paths_of(app).contains(&target) {
                    undo_swaps(&swapped);
                    return Err(BackupError::Refused(format!(
                        "{} is no longer declared in the paths of {}: refusing to restore it",
                        target.display(),
                        app.name
                    )));
                }
                let step = format!("restore {}", target.display());
                ctx.step_started(&step, "extract into a staging directory, then swap");
                let known_size = (file.content_bytes > 0).then_some(file.content_bytes);
                match stage_and_swap(
                    ctx,
                    &step,
                    &dir.join(&file.name),
                    compression,
                    &target,
                    known_size,
                )
                .await
                {
                    Ok(s) => {
                        ctx.step_finished(
                            &step,
                            crate::ops::log::StepOutcome::Succeeded,
                            "swapped in",
                        );
                        swapped.push(s);
                    }
                    Err(e) => {
                        ctx.step_finished(
                            &step,
                            crate::ops::log::StepOutcome::Failed,
                            e.to_string(),
                        );
                        undo_swaps(&swapped);
                        return Err(e);
                    }
                }
            }
        }
        if opts.database
            && let (Some(dbm), Some(pg)) = (&manifest.database, db_target(app)?)
        {
            check_dump_kind(dbm, &pg)?;
            let step = "restore database";
            ctx.step_started(
                step,
                format!(
                    "restore beside the live database, check row counts, swap with {}",
                    pg.name()
                ),
            );
            let db_rid = rid.replace(|c: char| !c.is_ascii_alphanumeric(), "_");
            match pg
                .restore_swap(&dir.join(DUMP_FILE), &db_rid, &dbm.row_counts, DB_TIMEOUT)
                .await
            {
                Ok(outcome) => {
                    ctx.step_finished(
                        step,
                        crate::ops::log::StepOutcome::Succeeded,
                        outcome.describe(),
                    );
                    report.database_kept_as = Some(outcome.kept_as);
                }
                Err(e) => {
                    ctx.step_finished(step, crate::ops::log::StepOutcome::Failed, e.to_string());
                    undo_swaps(&swapped);
                    return Err(e.into());
                }
            }
        }
        // Everything is in place: the replaced trees can go.
        for s in &swapped {
            if let Some(old) = &s.previous {
                let _ = s.staging.parent.remove_tree(old);
            }
            let _ = s.staging.remove();
            report.paths.push(s.target.clone());
        }
        Ok(report)
    }
}

#[derive(Debug, Default, Clone)]
pub struct RestoreReport {
    pub paths: Vec<PathBuf>,
    pub database_kept_as: Option<String>,
}

fn finish_step<T, E: std::fmt::Display>(
    ctx: &OpContext,
    step: &str,
    result: Result<T, &E>,
) -> Result<(), BackupError>
where
    T: Into<String>,
{
    match result {
        Ok(detail) => {
            ctx.step_finished(step, crate::ops::log::StepOutcome::Succeeded, detail.into())
        }
        Err(e) => ctx.step_finished(step, crate::ops::log::StepOutcome::Failed, e.to_string()),
    }
    Ok(())
}

async fn run_archive(
    source: PathBuf,
    dest: PathBuf,
    compression: Compression,
    on_bytes: impl Fn(u64) + Send + Sync + 'static,
    cancel: Arc<AtomicBool>,
) -> Result<archive::ArchiveStats, BackupError> {
    tokio::task::spawn_blocking(move || {
        let progress = Progress {
            on_bytes: &on_bytes,
            cancel: &cancel,
        };
        Ok(archive::create(&source, &dest, compression, &progress)?)
    })
    .await
    .map_err(|e| BackupError::Refused(format!("archive task failed: {e}")))?
}

/// Whether an error only says that the work was stopped.
fn is_stop(error: &BackupError) -> bool {
    matches!(
        error,
        BackupError::Canceled
            | BackupError::Archive(ArchiveError::Canceled)
            | BackupError::Db(db::DbError::Canceled)
    )
}

/// A failed step's detail; a part stopped because the other one failed
/// says so instead of "canceled".
fn failure_detail(ctx: &OpContext, error: &BackupError, other_failed: &str) -> String {
    if is_stop(error) && !ctx.canceled() {
        format!("stopped: {other_failed}")
    } else {
        error.to_string()
    }
}

/// Runs two parts of a backup at the same time (the files' archives, CPU
/// in the agent, and the dump, mostly `pg_dump`). The first part to fail
/// sets `stop`, which the other checks between chunks of its work; its
/// error is returned once both have ended, so nothing is still writing
/// when the caller removes the partial backup. The operation's `cancel`
/// sets `stop` too.
async fn run_both<A, B>(
    cancel: &AtomicBool,
    stop: &AtomicBool,
    first: impl Future<Output = Result<A, BackupError>>,
    second: impl Future<Output = Result<B, BackupError>>,
) -> Result<(A, B), BackupError> {
    // 0: nothing failed yet, else which part failed first.
    let first_failure = AtomicU8::new(0);
    let failed = |which: u8| {
        let _ = first_failure.compare_exchange(0, which, Ordering::SeqCst, Ordering::SeqCst);
        stop.store(true, Ordering::SeqCst);
    };
    let first = async {
        let result = first.await;
        if result.is_err() {
            failed(1);
        }
        result
    };
    let second = async {
        let result = second.await;
        if result.is_err() {
            failed(2);
        }
        result
    };
    let both = async { tokio::join!(first, second) };
    tokio::pin!(both);
    let results = loop {
        tokio::select! {
            results = &mut both => break results,
            () = tokio::time::sleep(CANCEL_POLL) => {
                if cancel.load(Ordering::Relaxed) {
                    stop.store(true, Ordering::SeqCst);
                }
            }
        }
    };
    match results {
        (Ok(a), Ok(b)) => Ok((a, b)),
        (Err(e), Ok(_)) | (Ok(_), Err(e)) => Err(e),
        (Err(a), Err(b)) => {
            if first_failure.load(Ordering::SeqCst) == 2 {
                Err(b)
            } else {
                Err(a)
            }
        }
    }
}

/// Bytes done by the parts of one backup, reported as one running total
/// against the preflight estimate, at most every [`PROGRESS_EVERY`]
/// whichever part reports.
struct BackupProgress {
    ctx: OpContext,
    estimate: u64,
    done: AtomicU64,
    last: std::sync::Mutex<Option<Instant>>,
}

impl BackupProgress {
    fn new(ctx: &OpContext, estimate: u64) -> BackupProgress {
        BackupProgress {
            ctx: ctx.clone(),
            estimate,
            done: AtomicU64::new(0),
            last: std::sync::Mutex::new(None),
        }
    }

    fn add(&self, step: &str, bytes: u64) {
        let total = self.done.fetch_add(bytes, Ordering::Relaxed) + bytes;
        {
            let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|at| at.elapsed() < PROGRESS_EVERY) {
                return;
            }
            *last = Some(Instant::now());
        }
        self.ctx
            .progress(step, total, self.estimate.max(total), "bytes");
    }

    /// A reporter for one part, whose calls give that part's own running
    /// count of bytes.
    fn part(self: &Arc<Self>, step: &str) -> impl Fn(u64) + Send + Sync + 'static {
        let shared = self.clone();
        let step = step.to_owned();
        let seen = AtomicU64::new(0);
        move |n| {
            let before = seen.swap(n, Ordering::Relaxed);
            shared.add(&step, n.saturating_sub(before));
        }
    }
}

/// A path swapped in by a restore, and where what it replaced went; every
/// name lives in the directory `staging.parent` (held open).
#[derive(Debug)]
struct SwappedPath {
    target: PathBuf,
    name: OsString,
    previous: Option<OsString>,
    staging: Staging,
}

/// Extracts into a fresh staging directory beside `target` (unpredictable
/// name, checked with fstat, used only through its descriptor), then swaps
/// by rename between the held directories: a user who can write the
/// target's parent cannot redirect any of it elsewhere.
async fn stage_and_swap(
    ctx: &OpContext,
    step: &str,
    archive_path: &Path,
    compression: Compression,
    target: &Path,
    known_size: Option<u64>,
) -> Result<SwappedPath, BackupError> {
    let parent = target
        .parent()
        .ok_or_else(|| {
            BackupError::Refused(format!("{} has no parent directory", target.display()))
        })?
        .to_owned();
    let name = target
        .file_name()
        .ok_or_else(|| BackupError::Refused(format!("{} has no file name", target.display())))?
        .to_owned();
    std::fs::create_dir_all(&parent).map_err(io("cannot create", &parent))?;
    let parent_dir = Dir::open(&parent).map_err(io("cannot open", &parent))?;
    let staging = Staging::create(parent_dir, &format!("{}.restore", name.to_string_lossy()))
        .map_err(io("cannot make a staging directory in", &parent))?;
    let staging_path = parent.join(&staging.name);
    let archive_path = archive_path.to_owned();
    let progress_ctx = ctx.clone();
    let step_name = step.to_owned();
    let cancel = ctx.cancel_flag();
    let joined = tokio::task::spawn_blocking(move || {
        // With a known total the journal throttles these reports.
        let total = known_size.unwrap_or(0);
        let on_bytes = |n: u64| progress_ctx.progress(&step_name, n, total.max(n), "bytes");
        let progress = Progress {
            on_bytes: &on_bytes,
            cancel: &cancel,
        };
        let result = archive::extract_into(
            &archive_path,
            compression,
            &staging.dir,
            &staging_path,
            archive::ExtractOptions {
                owner: None,
                known_size,
            },
            &progress,
        );
        (staging, result)
    })
    .await
    .map_err(|e| BackupError::Refused(format!("extract task failed: {e}")))?;
    let (staging, extracted) = joined;
    let staged = match extracted {
        Ok(_) => staging
            .dir
            .stat_at(&name)
            .map_err(io("cannot read", target)),
        Err(e) => Err(BackupError::from(e)),
    };
    if let Err(e) = staged.and_then(|st| match st {
        Some(_) => Ok(()),
        None => Err(BackupError::Corrupt {
            id: String::new(),
            why: format!("the archive does not hold {}", name.to_string_lossy()),
        }),
    }) {
        let _ = staging.remove();
        return Err(e);
    }
    let held = &staging.parent;
    let previous = OsString::from(format!(
        ".{}.before-{}",
        name.to_string_lossy(),
        crate::files::safe::random_suffix().map_err(io("cannot name the old copy of", target))?
    ));
    let had_previous = held
        .stat_at(&name)
        .map_err(io("cannot read", target))?
        .is_some();
    if had_previous && let Err(e) = held.rename(&name, held, &previous) {
        let _ = staging.remove();
        return Err(io("cannot move aside", target)(e));
    }
    if let Err(e) = staging.dir.rename(&name, held, &name) {
        if had_previous {
            let _ = held.rename(&previous, held, &name);
        }
        let _ = staging.remove();
        return Err(io("cannot swap in", target)(e));
    }
    let _ = held.sync();
    Ok(SwappedPath {
        target: target.to_owned(),
        name,
        previous: had_previous.then_some(previous),
        staging,
    })
}

/// Puts back what a failed restore replaced, newest first.
fn undo_swaps(swapped: &[SwappedPath]) {
    for s in swapped.iter().rev() {
        let held = &s.staging.parent;
        let _ = held.remove_tree(&s.name);
        if let Some(old) = &s.previous
            && let Err(e) = held.rename(old, held, &s.name)
        {
            tracing::error!(target = %s.target.display(), "cannot put back {}: {e}", old.to_string_lossy());
        }
        let _ = s.staging.remove();
    }
}

pub fn read_manifest(dir: &Path) -> Result<Manifest, BackupError> {
    let path = dir.join(MANIFEST);
    let bytes = std::fs::read(&path).map_err(io("cannot read", &path))?;
    serde_json::from_slice(&bytes).map_err(|e| BackupError::Corrupt {
        id: dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        why: format!("manifest: {e}"),
    })
}

/// SHA-256 of a file, hex, read in large blocks off the async threads.
pub async fn sha256_file(path: &Path) -> Result<String, BackupError> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut file = std::fs::File::open(&path).map_err(io("cannot read", &path))?;
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buf).map_err(io("cannot read", &path))?;
            if n == 0 {
                break;
            }
            ctx.update(&buf[..n]);
        }
        Ok(hex::encode(ctx.finish()))
    })
    .await
    .map_err(|e| BackupError::Refused(format!("checksum task failed: {e}")))?
}

/// What a backup of the app holds: its declared `paths`, and also its
/// env file and a pip package's virtualenv when no declared path holds
/// them already, so a rollback can always put those back.
pub fn paths_of(app: &AppConfig) -> Vec<PathBuf> {
    let mut paths = app.paths.clone();
    let package_paths = app
        .package
        .as_ref()
        .map(crate::packages::backup_paths)
        .unwrap_or_default();
    for extra in app.env_file.clone().into_iter().chain(package_paths) {
        if !paths.iter().any(|p| extra.starts_with(p)) {
            paths.push(extra);
        }
    }
    paths
}

/// A cancel flag that is never set, for callers without an operation.
pub fn never_canceled() -> AtomicBool {
    AtomicBool::new(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(why: &str) -> BackupError {
        BackupError::Refused(why.to_owned())
    }

    /// A part that runs a real `sleep` and, like the dump, stops it (kill,
    /// then wait) once `stop` is set; returns the pid.
    async fn sleeping_part(
        stop: &AtomicBool,
        pid: &std::sync::Mutex<Option<u32>>,
    ) -> Result<(), BackupError> {
        let mut child = tokio::process::Command::new("sleep")
            .arg("30")
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        *pid.lock().unwrap() = child.id();
        loop {
            tokio::select! {
                status = child.wait() => {
                    status.unwrap();
                    return Ok(());
                }
                () = tokio::time::sleep(Duration::from_millis(20)) => {
                    if stop.load(Ordering::SeqCst) {
                        child.kill().await.unwrap();
                        return Err(BackupError::Db(db::DbError::Canceled));
                    }
                }
            }
        }
    }

    fn process_exists(pid: u32) -> bool {
        // SAFETY: signal 0 only checks that the process exists.
        unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
    }

    #[tokio::test]
    async fn a_failing_part_stops_the_running_process_of_the_other() {
        let (cancel, stop) = (AtomicBool::new(false), AtomicBool::new(false));
        let pid = std::sync::Mutex::new(None);
        let started = Instant::now();
        let archive = async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            Err::<(), _>(refused("the archive broke"))
        };
        let result = run_both(&cancel, &stop, archive, sleeping_part(&stop, &pid)).await;
        let e = result.unwrap_err();
        assert_eq!(e.to_string(), "the archive broke", "the first failure wins");
        assert!(started.elapsed() < Duration::from_secs(10));
        let pid = pid.lock().unwrap().unwrap();
        assert!(!process_exists(pid), "sleep {pid} was stopped and reaped");
        assert!(stop.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn the_failure_is_returned_only_once_the_stopped_part_has_ended() {
        let (cancel, stop) = (AtomicBool::new(false), AtomicBool::new(false));
        let ended = AtomicBool::new(false);
        // The archive part: blocking work that notices `stop` between chunks.
        let archiving = async {
            for _ in 0..500 {
                if stop.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    ended.store(true, Ordering::SeqCst);
                    return Err::<(), _>(BackupError::Archive(ArchiveError::Canceled));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Ok(())
        };
        let dump = async { Err::<(), _>(refused("database \"x\" does not exist")) };
        let e = run_both(&cancel, &stop, archiving, dump).await.unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
        assert!(ended.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn cancel_stops_both_parts_and_success_needs_both() {
        let (cancel, stop) = (AtomicBool::new(false), AtomicBool::new(false));
        let pid = std::sync::Mutex::new(None);
        let other_pid = std::sync::Mutex::new(None);
        let canceling = async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            cancel.store(true, Ordering::SeqCst);
        };
        let (result, ()) = tokio::join!(
            run_both(
                &cancel,
                &stop,
                sleeping_part(&stop, &pid),
                sleeping_part(&stop, &other_pid)
            ),
            canceling
        );
        let e = result.unwrap_err();
        assert!(is_stop(&e), "{e}");
        for pid in [pid, other_pid] {
            assert!(!process_exists(pid.lock().unwrap().unwrap()));
        }

        let (cancel, stop) = (AtomicBool::new(false), AtomicBool::new(false));
        let both = run_both(&cancel, &stop, async { Ok(1) }, async { Ok("two") }).await;
        assert_eq!(both.unwrap(), (1, "two"));
        assert!(!stop.load(Ordering::SeqCst));
    }

    #[test]
    fn a_stopped_part_says_why() {
        assert!(is_stop(&BackupError::Archive(ArchiveError::Canceled)));
        assert!(is_stop(&BackupError::Db(db::DbError::Canceled)));
        assert!(!is_stop(&refused("disk full")));
    }
}
