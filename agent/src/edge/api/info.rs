//! InfoService: who this agent is, what it runs on, which apps it declares,
//! and who is asking.

use covet_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::{AgentState, caller, caller_to_pb, duration, timestamp};
use crate::config::AppConfig;
use crate::host::info::HostInfo;

pub struct InfoApi(pub AgentState);

#[tonic::async_trait]
impl pb::info_service_server::InfoService for InfoApi {
    async fn get_info(
        &self,
        request: Request<pb::GetInfoRequest>,
    ) -> Result<Response<pb::AgentInfo>, Status> {
        let host = HostInfo::current();
        let apps = self.0.config.apps.iter().map(app_summary_to_pb).collect();
        Ok(Response::new(pb::AgentInfo {
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            api_versions: vec!["v1".to_owned()],
            hostname: host.hostname,
            os_name: host.os_name,
            os_version: host.os_version,
            kernel_version: host.kernel_version,
            arch: host.arch,
            uptime: Some(duration(host.uptime)),
            boot_id: host.boot_id,
            agent_started: Some(timestamp(crate::host::info::agent_started())),
            apps,
            caller: caller(&request).map(|c| caller_to_pb(&c)),
            machine_id: host.machine_id,
        }))
    }
}

fn app_summary_to_pb(app: &AppConfig) -> pb::AppSummary {
    pb::AppSummary {
        name: app.name.clone(),
        unit: app.unit.clone(),
        package_kind: app
            .package
            .as_ref()
            .map(|p| p.kind().to_owned())
            .unwrap_or_default(),
        package_name: app
            .package
            .as_ref()
            .map(|p| p.name().to_owned())
            .unwrap_or_default(),
        has_database: app.database.is_some(),
        has_health_probe: app.health.is_some(),
        smoke_checks: u32::try_from(app.smoke.len()).unwrap_or(u32::MAX),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_app_is_summarised_from_its_declaration() {
        let config = super::super::testing::config();
        let apps: Vec<_> = config.apps.iter().map(app_summary_to_pb).collect();
        assert_eq!(
            apps[0],
            pb::AppSummary {
                name: "covet".into(),
                unit: "covet.service".into(),
                package_kind: "pip".into(),
                package_name: "covet".into(),
                has_database: true,
                has_health_probe: true,
                smoke_checks: 1,
            }
        );
        assert_eq!(
            apps[1],
            pb::AppSummary {
                name: "bare".into(),
                unit: "bare.service".into(),
                ..Default::default()
            }
        );
    }
}
