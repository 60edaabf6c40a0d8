//! The API edge against a real agent over mTLS: every service refuses bad
//! input with the exact code and a message that names the field, before
//! anything is journaled, locked or touched (issue #13: one parser per
//! request at the edge).

use covet_proto::v1 as pb;
use covet_tests::agent::TestAgent;
use covet_tests::sandbox_dir;
use tonic::Code;

const APP_TOML: &str = r#"
[[app]]
name = "covet"
unit = "covet.service"
env_keys = ["FEATURE_*"]
[app.package]
kind = "pip"
name = "covetpy"
venv = "/opt/covet/venv"
"#;

#[track_caller]
fn refused<T: std::fmt::Debug>(result: Result<T, tonic::Status>, code: Code, field: &str) {
    let status = result.unwrap_err();
    assert_eq!(status.code(), code, "{field}: {status:?}");
    assert!(
        status.message().contains(field),
        "the message names {field:?}: {status:?}"
    );
}

fn secs(seconds: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration { seconds, nanos: 0 })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_refuses_bad_input_by_field_and_changes_nothing() {
    let dir = sandbox_dir("api-edge");
    let agent = TestAgent::start_with_toml(dir.path(), APP_TOML.into()).await;
    let admin = agent.channel("admin").await;
    let mut upgrades = pb::upgrade_service_client::UpgradeServiceClient::new(admin.clone());
    let mut backups = pb::backup_service_client::BackupServiceClient::new(admin.clone());
    let mut operations = pb::operation_service_client::OperationServiceClient::new(admin.clone());
    let mut units = pb::unit_service_client::UnitServiceClient::new(admin.clone());
    let mut logs = pb::log_service_client::LogServiceClient::new(admin.clone());
    let mut probes = pb::probe_service_client::ProbeServiceClient::new(admin.clone());
    let mut metrics = pb::metrics_service_client::MetricsServiceClient::new(admin.clone());

    let upgrade = |app: &str, to_version: &str| pb::UpgradeRequest {
        app: app.into(),
        to_version: to_version.into(),
        ..Default::default()
    };
    refused(
        upgrades.upgrade(upgrade("", "0.2.0")).await,
        Code::InvalidArgument,
        "app is required",
    );
    refused(
        upgrades.upgrade(upgrade("shop", "0.2.0")).await,
        Code::NotFound,
        "no app \"shop\"",
    );
    refused(
        upgrades.upgrade(upgrade("covet", "")).await,
        Code::InvalidArgument,
        "to_version",
    );
    refused(
        upgrades.upgrade(upgrade("covet", "0.2.0/../x")).await,
        Code::InvalidArgument,
        "invalid version",
    );
    refused(
        upgrades
            .plan_upgrade(upgrade("covet", "--index-url=x"))
            .await,
        Code::InvalidArgument,
        "invalid version",
    );
    let mut watched = upgrade("covet", "0.2.0");
    watched.watch = secs(-1);
    refused(
        upgrades.upgrade(watched).await,
        Code::InvalidArgument,
        "watch",
    );
    let mut edit = upgrade("covet", "0.2.0");
    edit.env_edits = vec![pb::EnvEdit {
        edit: Some(pb::env_edit::Edit::Unset(pb::EnvUnset {
            key: "PATH".into(),
        })),
    }];
    refused(upgrades.upgrade(edit).await, Code::PermissionDenied, "PATH");
    refused(
        upgrades
            .rollback(pb::RollbackRequest {
                app: "covet".into(),
                backup_id: "../../etc".into(),
            })
            .await,
        Code::InvalidArgument,
        "not a backup id",
    );

    refused(
        backups
            .create_backup(pb::CreateBackupRequest {
                app: "covet".into(),
                skip_database: true,
                skip_files: true,
                compression: 0,
            })
            .await,
        Code::InvalidArgument,
        "both files and database are skipped",
    );
    refused(
        backups
            .create_backup(pb::CreateBackupRequest {
                app: "covet".into(),
                compression: 42,
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "compression",
    );
    refused(
        backups
            .restore_backup(pb::RestoreBackupRequest {
                id: "b1".into(),
                files_only: true,
                database_only: true,
            })
            .await,
        Code::InvalidArgument,
        "files_only and database_only",
    );
    for id in ["..", "a/b", ".hidden", ""] {
        refused(
            backups
                .get_backup(pb::GetBackupRequest { id: id.into() })
                .await,
            Code::InvalidArgument,
            "not a backup id",
        );
        let download = backups
            .download_backup(pb::DownloadBackupRequest {
                id: id.into(),
                file: String::new(),
            })
            .await;
        refused(
            download.map(|_| ()),
            Code::InvalidArgument,
            "not a backup id",
        );
    }
    refused(
        backups
            .get_backup(pb::GetBackupRequest {
                id: "covet-20261201-000000".into(),
            })
            .await,
        Code::NotFound,
        "no backup covet-20261201-000000",
    );
    refused(
        backups
            .prune_backups(pb::PruneBackupsRequest { app: "shop".into() })
            .await,
        Code::NotFound,
        "no app \"shop\"",
    );

    for (id, says) in [("", "operation id is empty"), ("op/1", "letters, digits")] {
        refused(
            operations
                .cancel_operation(pb::CancelOperationRequest { id: id.into() })
                .await,
            Code::InvalidArgument,
            says,
        );
    }
    refused(
        units
            .restart_unit(pb::UnitActionRequest {
                unit: "covet.service".into(),
                timeout: None,
                journal_lines: 501,
            })
            .await,
        Code::InvalidArgument,
        "journal_lines",
    );
    refused(
        units
            .stop_unit(pb::UnitActionRequest {
                unit: "covet.service".into(),
                timeout: secs(901),
                journal_lines: 0,
            })
            .await,
        Code::InvalidArgument,
        "timeout",
    );
    refused(
        logs.tail_logs(pb::TailLogsRequest {
            unit: "covet.service".into(),
            lines: 10_001,
            since: None,
        })
        .await,
        Code::InvalidArgument,
        "lines",
    );
    refused(
        probes
            .probe_http(pb::HttpProbe {
                url: "http://127.0.0.1:1/".into(),
                expect_status: 600,
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "expect_status",
    );
    refused(
        probes
            .probe_tcp(pb::TcpProbe {
                address: "127.0.0.1:1".into(),
                retries: 31,
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "retries",
    );
    refused(
        probes
            .check_app_health(pb::CheckAppHealthRequest {
                app: "covet".into(),
                include_smoke: false,
            })
            .await,
        Code::FailedPrecondition,
        "[app.health]",
    );
    let fast = Some(prost_types::Duration {
        seconds: 0,
        nanos: 1_000_000,
    });
    let watch = metrics
        .watch_metrics(pb::WatchMetricsRequest { interval: fast })
        .await;
    refused(watch.map(|_| ()), Code::InvalidArgument, "interval");

    // Nothing was journaled, locked or written.
    let listed = operations
        .list_operations(pb::ListOperationsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.operations.is_empty(), "{:?}", listed.operations);
    let left = std::fs::read_dir(dir.path().join("backups"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(left, 0, "the backup directory stays empty");
    // And a well-formed request still goes through the same edge.
    let info = pb::info_service_client::InfoServiceClient::new(admin)
        .get_info(pb::GetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.apps[0].name, "covet");
    assert_eq!(info.apps[0].package_kind, "pip");
}
