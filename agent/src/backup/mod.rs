//! Backups of an app: one archive per declared path and a database dump,
//! described by a manifest of checksums, published only when complete.
//!
//! Layout: `backup_dir/APP/ID/{manifest.json, NN-NAME.tar.zst, database.dump.zst}`.
//! A backup is written under `backup_dir/APP/.ID.partial`, fsynced, then
//! renamed into place: anything without a readable manifest under its final
//! name is not a backup.

pub mod archive;

use std::collections::{BTreeMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::config::{AppConfig, RetentionConfig};
use crate::db::{self, PgTarget};
use crate::ops::OpContext;
use crate::safefs::{Dir, Staging};
use archive::{ArchiveError, Compression, Progress};
use std::ffi::OsString;

pub const MANIFEST: &str = "manifest.json";
pub const DUMP_FILE: &str = "database.dump.zst";
const DB_TIMEOUT: Duration = Duration::from_secs(6 * 3600);
const QUERY_TIMEOUT: Duration = Duration::from_secs(60);

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
    let ok = !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(BackupError::InvalidId(id.to_owned()))
    }
}

/// The database of an app as the db module needs it.
pub fn pg_target(app: &AppConfig) -> Result<Option<PgTarget>, BackupError> {
    let Some(d) = &app.database else {
        return Ok(None);
    };
    Ok(Some(PgTarget {
        dbname: d.dbname.clone(),
        host: d.host.clone(),
        port: d.port,
        user: d.user.clone(),
        os_user: d.os_user.clone(),
        bindir: PgTarget::discover_bindir()?,
    }))
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
            for path in &app.backup_paths() {
                needed += archive::measure(path)?.uncompressed_bytes;
            }
        }
        if opts.database {
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
        crate::private::create_dir_all(&dir).map_err(io("cannot create", &dir))?;
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
        let id = crate::journal::new_id(&app.name);
        let app_dir = self.app_dir(&app.name);
        let partial = app_dir.join(format!(".{id}.partial"));
        crate::private::create_dir_all(&partial).map_err(io("cannot create", &partial))?;
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
            package_version: crate::packages::installed_version(app)
                .await
                .unwrap_or_default(),
            compression: opts.compression.as_str().to_owned(),
            files: Vec::new(),
            database: None,
            total_bytes: 0,
        };
        let done = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        if opts.files {
            for (i, path) in app.backup_paths().iter().enumerate() {
                let base = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "root".to_owned());
                let name = format!("{i:02}-{base}.{}", opts.compression.extension());
                let step = format!("archive {}", path.display());
                ctx.step_started(
                    &step,
                    format!("tar + {} of {}", opts.compression.as_str(), path.display()),
                );
                let dest = dir.join(&name);
                let stats = run_archive(
                    ctx,
                    &step,
                    path.clone(),
                    dest.clone(),
                    opts.compression,
                    done.clone(),
                    estimate,
                )
                .await;
                let stats = match stats {
                    Ok(s) => s,
                    Err(e) => {
                        ctx.step_finished(
                            &step,
                            crate::journal::StepOutcome::Failed,
                            e.to_string(),
                        );
                        return Err(e);
                    }
                };
                let sha256 = sha256_file(&dest).await?;
                ctx.step_finished(
                    &step,
                    crate::journal::StepOutcome::Succeeded,
                    format!(
                        "{} files, {} bytes -> {} bytes",
                        stats.files, stats.uncompressed_bytes, stats.compressed_bytes
                    ),
                );
                manifest.files.push(ManifestFile {
                    name,
                    source_path: path.display().to_string(),
                    size: stats.compressed_bytes,
                    sha256,
                    content_bytes: stats.uncompressed_bytes,
                });
            }
        }
        if opts.database
            && let Some(pg) = pg_target(app)?
        {
            let step = "dump database";
            ctx.step_started(step, format!("pg_dump -Fc of {} through zstd", pg.dbname));
            let result = self.dump(ctx, step, &pg, dir, done.clone(), estimate).await;
            match result {
                Ok((file, db)) => {
                    ctx.step_finished(
                        step,
                        crate::journal::StepOutcome::Succeeded,
                        format!("{} tables, {} bytes", db.row_counts.len(), file.size),
                    );
                    manifest.files.push(file);
                    manifest.database = Some(db);
                }
                Err(e) => {
                    ctx.step_finished(step, crate::journal::StepOutcome::Failed, e.to_string());
                    return Err(e);
                }
            }
        }
        manifest.total_bytes = manifest.files.iter().map(|f| f.size).sum();
        let path = dir.join(MANIFEST);
        let bytes = serde_json::to_vec_pretty(&manifest)
            .map_err(|e| BackupError::Refused(e.to_string()))?;
        crate::private::write_synced(&path, &bytes).map_err(io("cannot write", &path))?;
        fsync_dir(dir).map_err(io("cannot sync", dir))?;
        Ok(manifest)
    }

    async fn dump(
        &self,
        ctx: &OpContext,
        step: &str,
        pg: &PgTarget,
        dir: &Path,
        done: std::sync::Arc<std::sync::atomic::AtomicU64>,
        estimate: u64,
    ) -> Result<(ManifestFile, ManifestDb), BackupError> {
        let server_version = ctx.waiting(db::server_version(pg, QUERY_TIMEOUT)).await?;
        // Counted before the dump: the app is expected to be quiet (it is
        // stopped or idle during an upgrade's backup).
        let row_counts = ctx.waiting(db::row_counts(pg, QUERY_TIMEOUT)).await?;
        let dest = dir.join(DUMP_FILE);
        let base = done.load(std::sync::atomic::Ordering::Relaxed);
        let progress_ctx = ctx.clone();
        let step_name = step.to_owned();
        let on_bytes = move |n: u64| {
            progress_ctx.progress(&step_name, base + n, estimate.max(base + n), "bytes");
        };
        let cancel = ctx.cancel_flag();
        let stats = ctx
            .waiting(db::dump(pg, &dest, DB_TIMEOUT, &on_bytes, &cancel))
            .await?;
        done.fetch_add(
            stats.uncompressed_bytes,
            std::sync::atomic::Ordering::Relaxed,
        );
        for line in stats.stderr.lines().filter(|l| !l.trim().is_empty()) {
            ctx.output(step, crate::journal::OutputStream::Stderr, line);
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
                dbname: pg.dbname.clone(),
                server_version,
                format: "pg_dump-custom+zstd".to_owned(),
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
        pg: Option<&PgTarget>,
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
        if manifest.database.is_some() {
            let step = "list dump";
            ctx.step_started(step, "pg_restore --list");
            let bindir = match pg {
                Some(pg) => pg.clone(),
                None => PgTarget {
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
            ctx.step_finished(step, crate::journal::StepOutcome::Failed, why.clone());
            return Err(BackupError::Corrupt {
                id: manifest.id.clone(),
                why,
            });
        }
        ctx.step_finished(
            step,
            crate::journal::StepOutcome::Succeeded,
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
                if !app.backup_paths().contains(&target) {
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
                            crate::journal::StepOutcome::Succeeded,
                            "swapped in",
                        );
                        swapped.push(s);
                    }
                    Err(e) => {
                        ctx.step_finished(
                            &step,
                            crate::journal::StepOutcome::Failed,
                            e.to_string(),
                        );
                        undo_swaps(&swapped);
                        return Err(e);
                    }
                }
            }
        }
        if opts.database
            && let (Some(dbm), Some(pg)) = (&manifest.database, pg_target(app)?)
        {
            let step = "restore database";
            ctx.step_started(
                step,
                format!(
                    "pg_restore into a new database, check row counts, swap with {}",
                    pg.dbname
                ),
            );
            let db_rid = rid.replace(|c: char| !c.is_ascii_alphanumeric(), "_");
            match db::restore_swap(
                &pg,
                &dir.join(DUMP_FILE),
                &db_rid,
                &dbm.row_counts,
                DB_TIMEOUT,
            )
            .await
            {
                Ok(outcome) => {
                    ctx.step_finished(
                        step,
                        crate::journal::StepOutcome::Succeeded,
                        outcome.describe(),
                    );
                    report.database_kept_as = Some(outcome.kept_as);
                }
                Err(e) => {
                    ctx.step_finished(step, crate::journal::StepOutcome::Failed, e.to_string());
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
            ctx.step_finished(step, crate::journal::StepOutcome::Succeeded, detail.into())
        }
        Err(e) => ctx.step_finished(step, crate::journal::StepOutcome::Failed, e.to_string()),
    }
    Ok(())
}

async fn run_archive(
    ctx: &OpContext,
    step: &str,
    source: PathBuf,
    dest: PathBuf,
    compression: Compression,
    done: std::sync::Arc<std::sync::atomic::AtomicU64>,
    estimate: u64,
) -> Result<archive::ArchiveStats, BackupError> {
    let ctx = ctx.clone();
    let step = step.to_owned();
    let cancel = ctx.cancel_flag();
    tokio::task::spawn_blocking(move || {
        let base = done.load(std::sync::atomic::Ordering::Relaxed);
        let on_bytes = |n: u64| ctx.progress(&step, base + n, estimate.max(base + n), "bytes");
        let progress = Progress {
            on_bytes: &on_bytes,
            cancel: &cancel,
        };
        let stats = archive::create(&source, &dest, compression, &progress)?;
        done.fetch_add(
            stats.uncompressed_bytes,
            std::sync::atomic::Ordering::Relaxed,
        );
        Ok(stats)
    })
    .await
    .map_err(|e| BackupError::Refused(format!("archive task failed: {e}")))?
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
        let on_bytes = |n: u64| progress_ctx.progress(&step_name, n, 0, "bytes");
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
        crate::safefs::random_suffix().map_err(io("cannot name the old copy of", target))?
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

pub fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Bytes available to unprivileged writers on the file system of `path`.
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `s` a valid out-pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(s.f_bavail * s.f_frsize)
}

/// A cancel flag that is never set, for callers without an operation.
pub fn never_canceled() -> AtomicBool {
    AtomicBool::new(false)
}
