//! BackupService: backups of declared apps — create, list, verify, prune,
//! delete, download and restore. What a backup holds and which are still
//! needed is `backup`'s to decide; this file parses and maps.

use std::path::PathBuf;

use covet_proto::v1 as pb;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status};

use super::{
    AgentState, backup_error, caller_record, name_error, op_error, operation_to_pb, oplog_error,
    timestamp,
};
use crate::archive::Compression;
use crate::backup::download::{Chunk, Download, DownloadError};
use crate::backup::references::References;
use crate::backup::{BackupStore, CreateOptions, Manifest, RestoreOptions, jobs};
use crate::config::Config;
use crate::edge::audit::set_target;
use crate::names::{AppName, BackupId};
use crate::ops::log::{Caller, OpKind};
use crate::ops::{OpContext, OpSpec, Outcome};

pub struct BackupApi(pub AgentState);

/// CreateBackup: what of a declared app to back up, and how compressed.
#[derive(Debug)]
struct CreateBackup {
    app: AppName,
    opts: CreateOptions,
}

fn parse_create_backup(
    req: pb::CreateBackupRequest,
    config: &Config,
) -> Result<CreateBackup, Status> {
    let app = AppName::declared(config, &req.app).map_err(name_error)?;
    if req.skip_files && req.skip_database {
        return Err(Status::invalid_argument(
            "nothing to back up: both files and database are skipped",
        ));
    }
    let opts = CreateOptions {
        files: !req.skip_files,
        // An app without a database has nothing to dump.
        database: !req.skip_database && app.config().database.is_some(),
        compression: compression_from_pb(req.compression)?,
    };
    Ok(CreateBackup { app, opts })
}

fn compression_from_pb(c: i32) -> Result<Compression, Status> {
    match pb::Compression::try_from(c) {
        Ok(pb::Compression::Unspecified | pb::Compression::Zstd) => Ok(Compression::Zstd),
        Ok(pb::Compression::Gzip) => Ok(Compression::Gzip),
        Ok(pb::Compression::None) => Ok(Compression::None),
        Err(_) => Err(Status::invalid_argument(format!("unknown compression {c}"))),
    }
}

/// ListBackups: one declared app's, or every declared app's (`None`).
fn parse_list_backups(
    req: pb::ListBackupsRequest,
    config: &Config,
) -> Result<Option<AppName>, Status> {
    if req.app.is_empty() {
        return Ok(None);
    }
    AppName::declared(config, &req.app)
        .map(Some)
        .map_err(name_error)
}

fn parse_backup_id(id: &str) -> Result<BackupId, Status> {
    BackupId::parse(id).map_err(name_error)
}

/// RestoreBackup: which backup, and its files, its database or both.
#[derive(Debug)]
struct RestoreBackup {
    id: BackupId,
    opts: RestoreOptions,
}

fn parse_restore_backup(req: &pb::RestoreBackupRequest) -> Result<RestoreBackup, Status> {
    if req.files_only && req.database_only {
        return Err(Status::invalid_argument(
            "files_only and database_only exclude each other",
        ));
    }
    Ok(RestoreBackup {
        id: parse_backup_id(&req.id)?,
        opts: RestoreOptions {
            files: !req.database_only,
            database: !req.files_only,
        },
    })
}

fn parse_prune_backups(req: &pb::PruneBackupsRequest, config: &Config) -> Result<AppName, Status> {
    AppName::declared(config, &req.app).map_err(name_error)
}

/// DownloadBackup: one file of the backup by name, or all of it as a tar.
#[derive(Debug)]
struct DownloadBackup {
    id: BackupId,
    file: Option<String>,
}

fn parse_download_backup(req: pb::DownloadBackupRequest) -> Result<DownloadBackup, Status> {
    Ok(DownloadBackup {
        id: parse_backup_id(&req.id)?,
        file: Some(req.file).filter(|f| !f.is_empty()),
    })
}

/// A tampered backup is FAILED_PRECONDITION, a file it does not hold NOT_FOUND.
fn download_error(e: DownloadError) -> Status {
    if e.is_refusal() {
        Status::failed_precondition(e.to_string())
    } else if matches!(e, DownloadError::NoSuchFile { .. }) {
        Status::not_found(e.to_string())
    } else {
        Status::internal(e.to_string())
    }
}

impl BackupApi {
    fn app_names(&self) -> Vec<&str> {
        self.0.config.apps.iter().map(|a| a.name.as_str()).collect()
    }

    fn find(&self, id: &BackupId) -> Result<(PathBuf, Manifest), Status> {
        self.0
            .backups
            .find(&self.app_names(), id.as_str())
            .map_err(backup_error)
    }

    fn references(&self) -> Result<References, Status> {
        Ok(References::of(
            self.0.ops.oplog().list().map_err(oplog_error)?,
        ))
    }

    fn start(
        &self,
        kind: OpKind,
        app: &str,
        caller: Caller,
        params: std::collections::BTreeMap<String, String>,
        exclusive: bool,
        work: impl FnOnce(
            OpContext,
        )
            -> std::pin::Pin<Box<dyn std::future::Future<Output = Outcome> + Send>>
        + Send
        + 'static,
    ) -> Result<Response<pb::Operation>, Status> {
        let spec = OpSpec {
            kind,
            app: app.to_owned(),
            caller,
            params,
            exclusive,
        };
        let op = self.0.ops.start(spec, work).map_err(op_error)?;
        Ok(Response::new(operation_to_pb(op)))
    }
}

#[tonic::async_trait]
impl pb::backup_service_server::BackupService for BackupApi {
    async fn create_backup(
        &self,
        request: Request<pb::CreateBackupRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        set_target(&request, format!("app={}", request.get_ref().app));
        let caller = caller_record(&request);
        let CreateBackup { app, opts } = parse_create_backup(request.into_inner(), &self.0.config)?;
        let app = app.into_config();
        self.0.ops.ensure_free(&app.name).map_err(op_error)?;
        if opts.database {
            crate::backup::check_database(&app)
                .await
                .map_err(backup_error)?;
        }
        let store = self.0.backups.clone();
        let reserve = self.0.config.backup.free_space_reserve_bytes;
        let preflight_app = app.clone();
        let estimate =
            tokio::task::spawn_blocking(move || store.preflight(&preflight_app, opts, reserve))
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(backup_error)?;
        let store = self.0.backups.clone();
        let params = [
            (
                "compression".to_owned(),
                opts.compression.as_str().to_owned(),
            ),
            ("files".to_owned(), opts.files.to_string()),
            ("database".to_owned(), opts.database.to_string()),
        ]
        .into();
        self.start(
            OpKind::BackupCreate,
            &app.name.clone(),
            caller,
            params,
            true,
            move |ctx| Box::pin(jobs::create(store, ctx, app, opts, estimate)),
        )
    }

    async fn list_backups(
        &self,
        request: Request<pb::ListBackupsRequest>,
    ) -> Result<Response<pb::ListBackupsResponse>, Status> {
        let app = parse_list_backups(request.into_inner(), &self.0.config)?;
        let apps = match &app {
            Some(app) => vec![app.as_str()],
            None => self.app_names(),
        };
        let refs = self.references()?;
        let backups = self
            .0
            .backups
            .list(&apps)
            .into_iter()
            .map(|m| {
                let r = refs.of_backup(&m.id).to_vec();
                manifest_to_pb(m, r)
            })
            .collect();
        Ok(Response::new(pb::ListBackupsResponse { backups }))
    }

    async fn get_backup(
        &self,
        request: Request<pb::GetBackupRequest>,
    ) -> Result<Response<pb::Backup>, Status> {
        let (_, m) = self.find(&parse_backup_id(&request.get_ref().id)?)?;
        let refs = self.references()?.of_backup(&m.id).to_vec();
        Ok(Response::new(manifest_to_pb(m, refs)))
    }

    async fn verify_backup(
        &self,
        request: Request<pb::GetBackupRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        set_target(&request, format!("backup={}", request.get_ref().id));
        let caller = caller_record(&request);
        let (dir, m) = self.find(&parse_backup_id(&request.get_ref().id)?)?;
        let app = AppName::declared(&self.0.config, &m.app)
            .map_err(name_error)?
            .into_config();
        let store = self.0.backups.clone();
        let app_name = m.app.clone();
        let params = [("backup".to_owned(), m.id.clone())].into();
        self.start(
            OpKind::BackupVerify,
            &app_name,
            caller,
            params,
            false,
            move |ctx| Box::pin(jobs::verify(store, ctx, app, dir, m)),
        )
    }

    async fn prune_backups(
        &self,
        request: Request<pb::PruneBackupsRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        set_target(&request, format!("app={}", request.get_ref().app));
        let caller = caller_record(&request);
        let app = parse_prune_backups(request.get_ref(), &self.0.config)?.into_config();
        let referenced = self.references()?.backups();
        let store = self.0.backups.clone();
        self.start(
            OpKind::BackupPrune,
            &app.name.clone(),
            caller,
            Default::default(),
            true,
            move |ctx| Box::pin(jobs::prune(store, ctx, app, referenced)),
        )
    }

    async fn delete_backup(
        &self,
        request: Request<pb::GetBackupRequest>,
    ) -> Result<Response<pb::DeleteBackupResponse>, Status> {
        set_target(&request, format!("backup={}", request.get_ref().id));
        let (dir, m) = self.find(&parse_backup_id(&request.get_ref().id)?)?;
        let refs = self.references()?;
        let ops = refs.of_backup(&m.id);
        if !ops.is_empty() {
            return Err(Status::failed_precondition(format!(
                "backup {} is still referenced by operation(s) {}",
                m.id,
                ops.join(", ")
            )));
        }
        let op = self
            .0
            .ops
            .begin_inline(OpSpec {
                kind: OpKind::BackupDelete,
                app: m.app.clone(),
                caller: caller_record(&request),
                params: [("backup".to_owned(), m.id.clone())].into(),
                exclusive: true,
            })
            .map_err(op_error)?;
        op.ctx().update(|r| r.backup_id = m.id.clone());
        let freed = match self.0.backups.delete(&dir, &m) {
            Ok(freed) => {
                op.finish(Outcome::Succeeded);
                freed
            }
            Err(e) => {
                op.finish(Outcome::Failed(e.to_string()));
                return Err(backup_error(e));
            }
        };
        Ok(Response::new(pb::DeleteBackupResponse {
            id: m.id,
            freed_bytes: freed,
        }))
    }

    async fn download_backup(
        &self,
        request: Request<pb::DownloadBackupRequest>,
    ) -> Result<Response<BoxStream<pb::BackupChunk>>, Status> {
        set_target(&request, format!("backup={}", request.get_ref().id));
        let req = parse_download_backup(request.into_inner())?;
        let (dir, m) = self.find(&req.id)?;
        let download = Download::open(&dir, &m, req.file.as_deref()).map_err(download_error)?;
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tokio::task::spawn_blocking(move || download.send(tx));
        Ok(Response::new(Box::pin(tokio_stream::StreamExt::map(
            ReceiverStream::new(rx),
            |r| r.map(chunk_to_pb).map_err(download_error),
        ))))
    }

    async fn restore_backup(
        &self,
        request: Request<pb::RestoreBackupRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        set_target(&request, format!("backup={}", request.get_ref().id));
        let caller = caller_record(&request);
        let RestoreBackup { id, opts } = parse_restore_backup(request.get_ref())?;
        let (dir, m) = self.find(&id)?;
        let app = AppName::declared(&self.0.config, &m.app)
            .map_err(name_error)?
            .into_config();
        if opts.database && !opts.files && m.database.is_none() {
            return Err(Status::failed_precondition(format!(
                "backup {} holds no database dump",
                m.id
            )));
        }
        self.0.ops.ensure_free(&app.name).map_err(op_error)?;
        // A damaged backup is refused before anything is touched.
        BackupStore::verify_checksums(&dir, &m).await.map_err(|e| {
            Status::failed_precondition(format!("{e}; refusing to restore from it"))
        })?;
        let store = self.0.backups.clone();
        let params = [("backup".to_owned(), m.id.clone())].into();
        self.start(
            OpKind::BackupRestore,
            &app.name.clone(),
            caller,
            params,
            true,
            move |ctx| Box::pin(jobs::restore(store, ctx, app, dir, m, opts)),
        )
    }
}

fn compression_to_pb(name: &str) -> pb::Compression {
    match name {
        "zstd" => pb::Compression::Zstd,
        "gzip" => pb::Compression::Gzip,
        "none" => pb::Compression::None,
        _ => pb::Compression::Unspecified,
    }
}

fn manifest_to_pb(m: Manifest, referenced_by: Vec<String>) -> pb::Backup {
    pb::Backup {
        created: Some(timestamp(m.created_time())),
        id: m.id,
        app: m.app,
        agent_version: m.agent_version,
        package_version: m.package_version,
        compression: compression_to_pb(&m.compression).into(),
        files: m
            .files
            .into_iter()
            .map(|f| pb::BackupFile {
                name: f.name,
                source_path: f.source_path,
                size_bytes: f.size,
                sha256: f.sha256,
            })
            .collect(),
        database: m.database.map(|d| pb::BackupDatabase {
            dbname: d.dbname,
            server_version: d.server_version,
            format: d.format,
            row_counts: d.row_counts.into_iter().collect(),
        }),
        total_bytes: m.total_bytes,
        referenced_by,
    }
}

fn chunk_to_pb(c: Chunk) -> pb::BackupChunk {
    pb::BackupChunk {
        offset: c.offset,
        data: c.data,
        total_bytes: c.total_bytes,
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{config, refused};
    use super::*;
    use tonic::Code;

    fn create(
        app: &str,
        skip_files: bool,
        skip_database: bool,
        compression: i32,
    ) -> pb::CreateBackupRequest {
        pb::CreateBackupRequest {
            app: app.into(),
            skip_database,
            skip_files,
            compression,
        }
    }

    #[test]
    fn a_backup_takes_the_database_only_of_an_app_that_declares_one() {
        let config = config();
        let full = parse_create_backup(create("covet", false, false, 0), &config).unwrap();
        assert_eq!(full.app.as_str(), "covet");
        assert!(full.opts.files && full.opts.database);
        assert_eq!(full.opts.compression, Compression::Zstd);
        let bare = parse_create_backup(
            create("bare", false, false, pb::Compression::Gzip as i32),
            &config,
        )
        .unwrap();
        assert!(bare.opts.files && !bare.opts.database);
        assert_eq!(bare.opts.compression, Compression::Gzip);
        let db_only = parse_create_backup(
            create("covet", true, false, pb::Compression::None as i32),
            &config,
        )
        .unwrap();
        assert!(!db_only.opts.files && db_only.opts.database);
        assert_eq!(db_only.opts.compression, Compression::None);
    }

    #[test]
    fn a_backup_of_nothing_or_of_no_app_is_refused() {
        let config = config();
        refused(
            parse_create_backup(create("", false, false, 0), &config),
            Code::InvalidArgument,
            "app is required",
        );
        refused(
            parse_create_backup(create("nope", false, false, 0), &config),
            Code::NotFound,
            "app \"nope\"",
        );
        refused(
            parse_create_backup(create("covet", true, true, 0), &config),
            Code::InvalidArgument,
            "both files and database are skipped",
        );
        refused(
            parse_create_backup(create("covet", false, false, 99), &config),
            Code::InvalidArgument,
            "unknown compression 99",
        );
    }

    #[test]
    fn listing_names_one_declared_app_or_all() {
        let config = config();
        let list =
            |app: &str| parse_list_backups(pb::ListBackupsRequest { app: app.into() }, &config);
        assert!(list("").unwrap().is_none());
        assert_eq!(list("bare").unwrap().unwrap().as_str(), "bare");
        refused(list("nope"), Code::NotFound, "no app \"nope\" is declared");
        let prune =
            |app: &str| parse_prune_backups(&pb::PruneBackupsRequest { app: app.into() }, &config);
        assert_eq!(prune("covet").unwrap().as_str(), "covet");
        refused(prune(""), Code::InvalidArgument, "app is required");
        refused(prune("other"), Code::NotFound, "app \"other\"");
    }

    #[test]
    fn a_restore_takes_files_database_or_both_of_a_well_formed_backup() {
        let restore = |id: &str, files_only, database_only| {
            parse_restore_backup(&pb::RestoreBackupRequest {
                id: id.into(),
                files_only,
                database_only,
            })
        };
        let both = restore("covet-20261201-221500", false, false).unwrap();
        assert_eq!(both.id.as_str(), "covet-20261201-221500");
        assert!(both.opts.files && both.opts.database);
        let files = restore("b1", true, false).unwrap();
        assert!(files.opts.files && !files.opts.database);
        let db = restore("b1", false, true).unwrap();
        assert!(!db.opts.files && db.opts.database);
        refused(
            restore("b1", true, true),
            Code::InvalidArgument,
            "files_only and database_only",
        );
        for bad in ["", "..", "../etc", "a/b", ".hidden"] {
            refused(
                restore(bad, false, false),
                Code::InvalidArgument,
                "is not a backup id",
            );
        }
    }

    #[test]
    fn a_download_is_one_named_file_or_the_whole_backup() {
        let download = |id: &str, file: &str| {
            parse_download_backup(pb::DownloadBackupRequest {
                id: id.into(),
                file: file.into(),
            })
        };
        let all = download("b1", "").unwrap();
        assert_eq!((all.id.as_str(), all.file), ("b1", None));
        let one = download("b1", "manifest.json").unwrap();
        assert_eq!(one.file.as_deref(), Some("manifest.json"));
        refused(
            download("../b1", ""),
            Code::InvalidArgument,
            "not a backup id",
        );
        refused(
            parse_backup_id(&"x".repeat(129)),
            Code::InvalidArgument,
            "not a backup id",
        );
    }

    #[test]
    fn download_errors_say_who_must_act() {
        let io = || std::io::Error::other("x");
        let tampered = download_error(DownloadError::NotAFile {
            id: "b1".into(),
            dir: "/b".into(),
            source: io(),
        });
        assert_eq!(tampered.code(), Code::FailedPrecondition);
        let missing = download_error(DownloadError::NoSuchFile {
            id: "b1".into(),
            file: "x".into(),
            files: "manifest.json".into(),
        });
        assert_eq!(missing.code(), Code::NotFound);
        let broken = download_error(DownloadError::Read {
            path: "/b/x".into(),
            source: io(),
        });
        assert_eq!(broken.code(), Code::Internal);
    }
}
