//! `covetctl backup …`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Subcommand, ValueEnum};
use covet_proto::v1 as pb;
use serde_json::json;

use crate::fleet::{Fleet, FleetArgs, Report};
use crate::operations::follow;
use crate::output;
use crate::target::{Node, connect_node};
use crate::{Global, Output};

#[derive(Clone, Copy, ValueEnum)]
pub enum CompressionArg {
    Zstd,
    Gzip,
    None,
}

#[derive(Subcommand)]
pub enum BackupCommand {
    /// Back up an app's declared paths and database.
    Create {
        app: String,
        /// Skip the database dump.
        #[arg(long)]
        no_db: bool,
        /// Skip the files.
        #[arg(long)]
        no_files: bool,
        #[arg(long, value_enum, default_value = "zstd")]
        compression: CompressionArg,
        /// Return once the operation is accepted instead of following it.
        #[arg(long)]
        detach: bool,
    },
    /// Valid backups, newest first.
    List {
        app: Option<String>,
        #[command(flatten)]
        fleet: FleetArgs,
    },
    /// One backup's manifest.
    Show { id: String },
    /// Recompute checksums, test-read the archives, list the dump.
    Verify { id: String },
    /// Apply the app's retention policy.
    Prune { app: String },
    /// Delete a backup (admin).
    Delete { id: String },
    /// Download a backup (admin): one file, or a tar of all of it.
    Download {
        id: String,
        #[arg(long)]
        to: PathBuf,
        /// One file of the backup (default: a tar of the whole backup).
        #[arg(long)]
        file: Option<String>,
    },
    /// Restore files and database from a backup (admin).
    Restore {
        id: String,
        #[arg(long, conflicts_with = "db_only")]
        files_only: bool,
        #[arg(long)]
        db_only: bool,
    },
}

fn backup_json(b: &pb::Backup) -> serde_json::Value {
    json!({
        "id": b.id,
        "app": b.app,
        "created": output::timestamp(b.created.as_ref()),
        "agent_version": b.agent_version,
        "package_version": b.package_version,
        "compression": pb::Compression::try_from(b.compression).map(|c| c.as_str_name().trim_start_matches("COMPRESSION_").to_lowercase()).unwrap_or_default(),
        "total_bytes": b.total_bytes,
        "files": b.files.iter().map(|f| json!({"name": f.name, "source_path": f.source_path, "size_bytes": f.size_bytes, "sha256": f.sha256})).collect::<Vec<_>>(),
        "database": b.database.as_ref().map(|d| json!({"dbname": d.dbname, "server_version": d.server_version, "format": d.format, "row_counts": d.row_counts})),
        "referenced_by": b.referenced_by,
    })
}

pub async fn backup(g: &Global, cmd: BackupCommand) -> anyhow::Result<ExitCode> {
    if let BackupCommand::List { app, fleet } = cmd {
        return list(g, app.unwrap_or_default(), &fleet).await;
    }
    let node = connect_node(g).await?;
    let mut client = pb::backup_service_client::BackupServiceClient::new(node.channel.clone());
    let op = match cmd {
        BackupCommand::Create {
            app,
            no_db,
            no_files,
            compression,
            detach,
        } => {
            let compression = match compression {
                CompressionArg::Zstd => pb::Compression::Zstd,
                CompressionArg::Gzip => pb::Compression::Gzip,
                CompressionArg::None => pb::Compression::None,
            };
            let op = client
                .create_backup(pb::CreateBackupRequest {
                    app,
                    skip_database: no_db,
                    skip_files: no_files,
                    compression: compression.into(),
                })
                .await
                .map_err(|s| node.fail(s))?
                .into_inner();
            if detach {
                println!("{}", op.id);
                return Ok(ExitCode::SUCCESS);
            }
            op
        }
        BackupCommand::List { .. } => return Ok(ExitCode::SUCCESS), // answered above, on every node
        BackupCommand::Show { id } => {
            let b = client
                .get_backup(pb::GetBackupRequest { id })
                .await
                .map_err(|s| node.fail(s))?
                .into_inner();
            if g.output == Output::Json {
                output::json(&backup_json(&b));
            } else {
                output::fields(&[
                    ("backup", b.id.clone()),
                    ("app", b.app.clone()),
                    ("created", output::timestamp(b.created.as_ref())),
                    ("package version", b.package_version.clone()),
                    ("agent version", b.agent_version.clone()),
                    ("size", output::bytes(b.total_bytes)),
                ]);
                println!();
                let rows: Vec<Vec<String>> = b
                    .files
                    .iter()
                    .map(|f| {
                        vec![
                            f.name.clone(),
                            f.source_path.clone(),
                            output::bytes(f.size_bytes),
                            f.sha256.chars().take(16).collect(),
                        ]
                    })
                    .collect();
                output::table(&["FILE", "SOURCE", "SIZE", "SHA256"], &rows);
                if let Some(d) = &b.database {
                    println!(
                        "\ndatabase {} (PostgreSQL {}, {}), {} tables",
                        d.dbname,
                        d.server_version,
                        d.format,
                        d.row_counts.len()
                    );
                }
            }
            return Ok(ExitCode::SUCCESS);
        }
        BackupCommand::Verify { id } => client
            .verify_backup(pb::GetBackupRequest { id })
            .await
            .map_err(|s| node.fail(s))?
            .into_inner(),
        BackupCommand::Prune { app } => client
            .prune_backups(pb::PruneBackupsRequest { app })
            .await
            .map_err(|s| node.fail(s))?
            .into_inner(),
        BackupCommand::Delete { id } => {
            let r = client
                .delete_backup(pb::GetBackupRequest { id })
                .await
                .map_err(|s| node.fail(s))?
                .into_inner();
            if g.output == Output::Json {
                output::json(&json!({ "id": r.id, "freed_bytes": r.freed_bytes }));
            } else {
                println!(
                    "deleted backup {} ({} freed)",
                    r.id,
                    output::bytes(r.freed_bytes)
                );
            }
            return Ok(ExitCode::SUCCESS);
        }
        BackupCommand::Download { id, to, file } => {
            return download(g, &node, &mut client, id, to, file).await;
        }
        BackupCommand::Restore {
            id,
            files_only,
            db_only,
        } => client
            .restore_backup(pb::RestoreBackupRequest {
                id,
                files_only,
                database_only: db_only,
            })
            .await
            .map_err(|s| node.fail(s))?
            .into_inner(),
    };
    follow(g, &node, op, 1).await
}

async fn list(g: &Global, app: String, fleet: &FleetArgs) -> anyhow::Result<ExitCode> {
    let fleet = Fleet::resolve(g, fleet)?;
    if fleet.is_single() {
        let node = fleet.single_node(g).await?;
        print_backups(g, &fetch_backups(&node, app).await?);
        return Ok(ExitCode::SUCCESS);
    }
    let app = &app;
    let results = fleet
        .fan_out(
            g,
            |node| async move { fetch_backups(&node, app.clone()).await },
        )
        .await?;
    let report = Report {
        header: BACKUP_HEADER,
        rows: &|backups: &Vec<pb::Backup>| backups.iter().map(backup_row).collect(),
        json: &|backups: &Vec<pb::Backup>| json!({ "backups": backups.iter().map(backup_json).collect::<Vec<_>>() }),
        ok: &|_| true,
    };
    Ok(report.print(g, &results))
}

async fn fetch_backups(node: &Node, app: String) -> anyhow::Result<Vec<pb::Backup>> {
    let mut client = pb::backup_service_client::BackupServiceClient::new(node.channel.clone());
    Ok(client
        .list_backups(pb::ListBackupsRequest { app })
        .await
        .map_err(|s| node.fail(s))?
        .into_inner()
        .backups)
}

const BACKUP_HEADER: &[&str] = &[
    "ID", "APP", "CREATED", "VERSION", "SIZE", "DATABASE", "USED BY",
];

fn backup_row(b: &pb::Backup) -> Vec<String> {
    vec![
        b.id.clone(),
        b.app.clone(),
        output::timestamp(b.created.as_ref()),
        if b.package_version.is_empty() {
            "-".into()
        } else {
            b.package_version.clone()
        },
        output::bytes(b.total_bytes),
        if b.database.is_some() { "yes" } else { "no" }.into(),
        b.referenced_by.join(","),
    ]
}

fn print_backups(g: &Global, backups: &[pb::Backup]) {
    if g.output == Output::Json {
        output::json(&json!({ "backups": backups.iter().map(backup_json).collect::<Vec<_>>() }));
    } else {
        output::table(
            BACKUP_HEADER,
            &backups.iter().map(backup_row).collect::<Vec<_>>(),
        );
    }
}

/// Creates `path` afresh (an old file or link of that name is removed
/// first), mode 0600 whatever the umask.
fn create_private(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    Ok(file)
}

async fn download(
    g: &Global,
    node: &crate::target::Node,
    client: &mut pb::backup_service_client::BackupServiceClient<tonic::transport::Channel>,
    id: String,
    to: PathBuf,
    file: Option<String>,
) -> anyhow::Result<ExitCode> {
    let mut stream = client
        .download_backup(pb::DownloadBackupRequest {
            id: id.clone(),
            file: file.unwrap_or_default(),
        })
        .await
        .map_err(|s| node.fail(s))?
        .into_inner();
    // Written next to the target and renamed when complete. A backup holds
    // secrets: the file is 0600 whatever the umask, and created new, so a
    // link planted at the partial name is replaced, never written through.
    let partial = to.with_extension("partial");
    let mut out =
        create_private(&partial).with_context(|| format!("cannot create {}", partial.display()))?;
    let mut written = 0u64;
    let result: anyhow::Result<()> = async {
        while let Some(chunk) = stream.message().await.map_err(|s| node.fail(s))? {
            anyhow::ensure!(
                chunk.offset == written,
                "the agent sent a chunk at offset {} after {written} bytes",
                chunk.offset
            );
            out.write_all(&chunk.data)?;
            written += chunk.data.len() as u64;
        }
        out.sync_all()?;
        Ok(())
    }
    .await;
    if let Err(e) = result {
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    std::fs::rename(&partial, &to).with_context(|| format!("cannot rename to {}", to.display()))?;
    if g.output == Output::Json {
        output::json(&json!({ "id": id, "path": to, "bytes": written }));
    } else {
        println!(
            "downloaded {} to {} ({})",
            id,
            to.display(),
            output::bytes(written)
        );
    }
    Ok(ExitCode::SUCCESS)
}
