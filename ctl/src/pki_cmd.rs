//! `covetctl pki …` and `covetctl config …`: local files only, no agent.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Subcommand;
use covetctl::contexts::{ClientConfig, Context};
use covetctl::pki::{self, Role};
use serde_json::json;

use crate::output;
use crate::{Global, Output};

#[derive(Subcommand)]
pub enum PkiCommand {
    /// Create a CA: DIR/ca.crt and DIR/ca.key.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// The CA's common name.
        #[arg(long, default_value = "covet CA")]
        cn: String,
    },
    /// Issue an agent (server) certificate: DIR/NAME.crt and DIR/NAME.key.
    IssueAgent {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        name: String,
        /// Subject alternative names: DNS names or IP addresses the agent is reached at.
        #[arg(long = "san", num_args = 1..)]
        sans: Vec<String>,
        #[arg(long, default_value = "365d")]
        ttl: String,
    },
    /// Issue a client certificate carrying a role: DIR/NAME.crt and DIR/NAME.key.
    IssueClient {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        name: String,
        /// reader, operator or admin.
        #[arg(long)]
        role: Role,
        #[arg(long, default_value = "90d")]
        ttl: String,
    },
    /// Revoke a certificate: append its serial to DIR/revoked.txt (the agent's deny file).
    Revoke {
        #[arg(long)]
        dir: PathBuf,
        cert: PathBuf,
    },
    /// Show a certificate's subject, role, serial and expiry.
    Show { cert: PathBuf },
}

/// Certificates that expire sooner than this get a warning.
const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 86400);

pub fn pki(g: &Global, cmd: PkiCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        PkiCommand::Init { dir, cn } => {
            let opts = pki::CaOptions {
                common_name: cn,
                ..Default::default()
            };
            let paths = pki::init_ca(&dir, &opts)?;
            report(g, "created CA", &paths.cert, &paths.key);
        }
        PkiCommand::IssueAgent {
            dir,
            name,
            sans,
            ttl,
        } => {
            let paths = pki::issue_agent(&dir, &name, &sans, pki::parse_ttl(&ttl)?)?;
            report(g, "issued agent certificate", &paths.cert, &paths.key);
        }
        PkiCommand::IssueClient {
            dir,
            name,
            role,
            ttl,
        } => {
            let paths = pki::issue_client(&dir, &name, role, pki::parse_ttl(&ttl)?)?;
            report(
                g,
                &format!("issued {role} client certificate"),
                &paths.cert,
                &paths.key,
            );
        }
        PkiCommand::Revoke { dir, cert } => {
            let serial = pki::revoke(&dir, &cert)?;
            let list = dir.join("revoked.txt");
            if g.output == Output::Json {
                output::json(&json!({ "serial": serial, "deny_file": list }));
            } else {
                println!("revoked serial {serial} (listed in {})", list.display());
                println!(
                    "point the agent's [tls] deny at that file and send it SIGHUP (systemctl reload covet-agent)"
                );
            }
        }
        PkiCommand::Show { cert } => {
            let s = pki::show(&cert)?;
            let warning = if s.is_expired() {
                Some("EXPIRED")
            } else if s.expires_within(EXPIRY_WARNING) {
                Some("expires in less than 14 days")
            } else {
                None
            };
            if g.output == Output::Json {
                let mut v = serde_json::to_value(&s)?;
                v["warning"] = json!(warning);
                output::json(&v);
            } else {
                let not_after = s
                    .not_after
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default();
                output::fields(&[
                    ("subject", s.subject.clone()),
                    (
                        "role",
                        s.role
                            .map(|r| r.to_string())
                            .unwrap_or_else(|| "none".to_owned()),
                    ),
                    ("serial", s.serial.clone()),
                    ("issuer", s.issuer.clone()),
                    (
                        "expires",
                        match warning {
                            Some(w) => format!("{not_after} (WARNING: {w})"),
                            None => not_after,
                        },
                    ),
                    ("sans", s.sans.join(", ")),
                    ("sha256", s.fingerprint_sha256.clone()),
                ]);
            }
            if warning.is_some() {
                eprintln!(
                    "warning: {} {}",
                    cert.display(),
                    warning.unwrap_or_default()
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn report(g: &Global, what: &str, cert: &std::path::Path, key: &std::path::Path) {
    if g.output == Output::Json {
        output::json(&json!({ "cert": cert, "key": key }));
    } else {
        println!(
            "{what}: {} (key {}, mode 0600)",
            cert.display(),
            key.display()
        );
    }
}

#[derive(Subcommand)]
pub enum ConfigCommand {
    /// Add a context; the first one added becomes current.
    /// Endpoints come from `-e/--endpoint HOST:PORT` (repeat for several nodes).
    AddContext {
        name: String,
        #[arg(long)]
        ca: PathBuf,
        #[arg(long)]
        cert: PathBuf,
        #[arg(long)]
        key: PathBuf,
        /// Name to verify in the agents' certificates when it differs from the endpoint host.
        #[arg(long)]
        server_name: Option<String>,
        /// Replace a context of the same name.
        #[arg(long)]
        replace: bool,
    },
    /// Make a context the current one.
    UseContext { name: String },
    /// Show the contexts.
    Show,
}

pub fn config(g: &Global, cmd: ConfigCommand) -> anyhow::Result<ExitCode> {
    let path = match &g.config {
        Some(p) => p.clone(),
        None => covetctl::contexts::default_path()?,
    };
    let mut config = ClientConfig::load(&path)?;
    match cmd {
        ConfigCommand::AddContext {
            name,
            ca,
            cert,
            key,
            server_name,
            replace,
        } => {
            if g.endpoints.is_empty() {
                anyhow::bail!("add-context needs at least one --endpoint HOST:PORT");
            }
            let ctx = Context {
                endpoints: g.endpoints.clone(),
                ca,
                cert,
                key,
                server_name,
            };
            config.add_context(&name, ctx, replace)?;
            config
                .save(&path)
                .with_context(|| format!("saving {}", path.display()))?;
            println!(
                "added context {name} to {}{}",
                path.display(),
                if config.current_context.as_deref() == Some(name.as_str()) {
                    " (current)"
                } else {
                    ""
                }
            );
        }
        ConfigCommand::UseContext { name } => {
            config.use_context(&name)?;
            config
                .save(&path)
                .with_context(|| format!("saving {}", path.display()))?;
            println!("current context: {name}");
        }
        ConfigCommand::Show => {
            if g.output == Output::Json {
                output::json(&serde_json::to_value(&config)?);
            } else {
                println!("file: {}", path.display());
                let rows: Vec<Vec<String>> = config
                    .contexts
                    .iter()
                    .map(|(name, c)| {
                        vec![
                            if config.current_context.as_deref() == Some(name) {
                                "*"
                            } else {
                                ""
                            }
                            .to_owned(),
                            name.clone(),
                            c.endpoints.join(","),
                            c.cert.display().to_string(),
                        ]
                    })
                    .collect();
                output::table(&["CURRENT", "NAME", "ENDPOINTS", "CERT"], &rows);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
