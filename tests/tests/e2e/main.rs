//! The end-to-end tests: one binary, one module per area, so the harness and
//! its dependencies are compiled and linked once, not once per file.

mod analysis;
mod ansible;
mod api_edge;
mod backup_speed;
mod backups;
mod bluegreen;
mod db;
mod fleet;
mod harness;
mod mysql;
mod packaging;
mod pkgswap;
mod process;
mod python_client;
mod release_kind;
mod repo_kinds;
mod sampleapp;
mod security_api;
mod security_env;
mod security_fs;
mod security_net;
mod spine;
mod sqlite;
mod units;
mod upgrades;
