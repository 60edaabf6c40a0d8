//! What the agent drives on the machine: systemd over D-Bus, journald,
//! external programs, system users, env files, sd_notify, host facts and
//! metrics.
//! Nothing here knows of apps' upgrades or of gRPC.

pub mod envfile;
pub mod info;
pub mod journald;
pub mod metrics;
pub mod notify;
pub mod process;
pub mod systemd;
pub mod users;
