//! Backups of an app: one archive per declared path and a database dump,
//! described by a manifest, published only when complete.

pub mod archive;
