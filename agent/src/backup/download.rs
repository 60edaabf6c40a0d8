//! A backup as a download: one of its files, or a tar of the whole backup
//! directory, sent as numbered chunks. Everything is opened before the first
//! byte, relative to the backup directory and never through a symlink, so a
//! refusal is an error and no byte of a link's target is ever read.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use tokio::sync::mpsc::Sender;

use crate::backup::{MANIFEST, Manifest};
use crate::files::safe::Dir;

/// Bytes per chunk sent.
pub const CHUNK: usize = 256 * 1024;

/// Part of a download; `total_bytes` is set on a file's first chunk only
/// (a tar's size is not known ahead).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub offset: u64,
    pub data: Vec<u8>,
    pub total_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    /// A symlink or other non-file in the backup directory: someone tampered with it.
    #[error(
        "backup {id} cannot be downloaded: {source} (a backup directory holds only regular files; inspect {} and delete the backup if it was tampered with)",
        dir.display()
    )]
    NotAFile {
        id: String,
        dir: PathBuf,
        source: io::Error,
    },
    #[error("backup {id} cannot be downloaded: {} is not a plain directory ({source})", dir.display())]
    NotADirectory {
        id: String,
        dir: PathBuf,
        source: io::Error,
    },
    #[error("cannot read backup {id} in {}: {source}", dir.display())]
    Unreadable {
        id: String,
        dir: PathBuf,
        source: io::Error,
    },
    #[error("backup {id} has no file {file:?} (files: {files})")]
    NoSuchFile {
        id: String,
        file: String,
        files: String,
    },
    #[error("reading {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("streaming backup {id}: {source}")]
    Stream { id: String, source: io::Error },
}

impl DownloadError {
    /// Tampering is the operator's to look at, not the agent's failure.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            DownloadError::NotAFile { .. } | DownloadError::NotADirectory { .. }
        )
    }
}

fn refusal(id: &str, dir: &Path, source: io::Error) -> DownloadError {
    let (id, dir) = (id.to_owned(), dir.to_owned());
    match source.kind() {
        io::ErrorKind::InvalidData => DownloadError::NotAFile { id, dir, source },
        _ if matches!(source.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)) => {
            DownloadError::NotADirectory { id, dir, source }
        }
        _ => DownloadError::Unreadable { id, dir, source },
    }
}

/// A download ready to send.
pub enum Download {
    File {
        file: File,
        path: PathBuf,
        total: u64,
    },
    Tar {
        id: String,
        files: Vec<(String, File)>,
    },
}

impl Download {
    /// Opens backup `manifest` in `dir`: the file named `file`, or with
    /// `None` every regular file of the directory (for a tar).
    pub fn open(
        dir: &Path,
        manifest: &Manifest,
        file: Option<&str>,
    ) -> Result<Download, DownloadError> {
        let refused = |e: io::Error| refusal(&manifest.id, dir, e);
        let backup_dir = Dir::open(dir).map_err(refused)?;
        let Some(name) = file else {
            let mut files = Vec::new();
            for name in backup_dir.names().map_err(refused)? {
                let file = backup_dir.open_regular(&name).map_err(refused)?;
                files.push((name.to_string_lossy().into_owned(), file));
            }
            return Ok(Download::Tar {
                id: manifest.id.clone(),
                files,
            });
        };
        let Some(entry) = manifest.files.iter().find(|f| f.name == name) else {
            return Err(DownloadError::NoSuchFile {
                id: manifest.id.clone(),
                file: name.to_owned(),
                files: manifest
                    .files
                    .iter()
                    .map(|f| f.name.as_str())
                    .chain([MANIFEST])
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        };
        let opened = backup_dir
            .open_regular(OsStr::new(&entry.name))
            .map_err(refused)?;
        Ok(Download::File {
            file: opened,
            path: dir.join(&entry.name),
            total: entry.size,
        })
    }

    /// Sends the download (blocking: run it on a blocking thread); stops
    /// quietly when the receiver goes away.
    pub fn send(self, tx: Sender<Result<Chunk, DownloadError>>) {
        match self {
            Download::File { file, path, total } => send_file(file, &path, total, &tx),
            Download::Tar { id, files } => send_tar(files, &id, tx),
        }
    }
}

fn send_file(mut file: File, path: &Path, total: u64, tx: &Sender<Result<Chunk, DownloadError>>) {
    let mut offset = 0u64;
    loop {
        let mut buf = vec![0u8; CHUNK];
        match file.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                buf.truncate(n);
                let chunk = Chunk {
                    offset,
                    data: buf,
                    total_bytes: if offset == 0 { total } else { 0 },
                };
                offset += n as u64;
                if tx.blocking_send(Ok(chunk)).is_err() {
                    return;
                }
            }
            Err(source) => {
                let _ = tx.blocking_send(Err(DownloadError::Read {
                    path: path.to_owned(),
                    source,
                }));
                return;
            }
        }
    }
}

/// Turns what the tar builder writes into chunks.
struct ChunkWriter {
    tx: Sender<Result<Chunk, DownloadError>>,
    offset: u64,
}

impl Write for ChunkWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let chunk = Chunk {
            offset: self.offset,
            data: buf.to_vec(),
            total_bytes: 0,
        };
        self.offset += buf.len() as u64;
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "client went away"))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A tar of the backup's files, each under `ID/`.
fn send_tar(files: Vec<(String, File)>, id: &str, tx: Sender<Result<Chunk, DownloadError>>) {
    let writer = io::BufWriter::with_capacity(
        CHUNK,
        ChunkWriter {
            tx: tx.clone(),
            offset: 0,
        },
    );
    let mut builder = tar::Builder::new(writer);
    let result = files
        .into_iter()
        .try_for_each(|(name, mut file)| {
            let meta = file.metadata()?;
            let mut header = tar::Header::new_gnu();
            header.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
            builder.append_data(&mut header, format!("{id}/{name}"), &mut file)
        })
        .and_then(|()| builder.into_inner())
        .and_then(|mut w| w.flush());
    if let Err(source) = result
        && source.kind() != io::ErrorKind::BrokenPipe
    {
        let _ = tx.blocking_send(Err(DownloadError::Stream {
            id: id.to_owned(),
            source,
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::ManifestFile;

    fn manifest(id: &str, files: &[(&str, u64)]) -> Manifest {
        Manifest {
            id: id.into(),
            app: "covet".into(),
            created: String::new(),
            created_unix_ms: 0,
            agent_version: String::new(),
            package_version: String::new(),
            compression: "zstd".into(),
            files: files
                .iter()
                .map(|(name, size)| ManifestFile {
                    name: (*name).into(),
                    source_path: String::new(),
                    size: *size,
                    sha256: String::new(),
                    content_bytes: 0,
                })
                .collect(),
            database: None,
            total_bytes: 0,
        }
    }

    fn collect(d: Download) -> Result<Vec<Chunk>, DownloadError> {
        let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
        std::thread::spawn(move || d.send(tx));
        let mut out = Vec::new();
        while let Some(c) = rx.blocking_recv() {
            out.push(c?);
        }
        Ok(out)
    }

    #[test]
    fn a_file_comes_in_numbered_chunks_and_a_tar_holds_every_file() {
        let tmp = tempfile::tempdir().unwrap();
        let big = vec![7u8; CHUNK + 10];
        std::fs::write(tmp.path().join("files.tar.zst"), &big).unwrap();
        std::fs::write(tmp.path().join(MANIFEST), b"{}").unwrap();
        let m = manifest("b1", &[("files.tar.zst", big.len() as u64)]);
        let chunks =
            collect(Download::open(tmp.path(), &m, Some("files.tar.zst")).unwrap()).unwrap();
        assert_eq!(chunks.len(), 2);
        assert_eq!(
            (chunks[0].offset, chunks[0].total_bytes),
            (0, big.len() as u64)
        );
        assert_eq!((chunks[1].offset, chunks[1].total_bytes), (CHUNK as u64, 0));
        let tar: Vec<u8> = collect(Download::open(tmp.path(), &m, None).unwrap())
            .unwrap()
            .into_iter()
            .flat_map(|c| c.data)
            .collect();
        let mut names: Vec<String> = tar::Archive::new(tar.as_slice())
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        names.sort();
        assert_eq!(names, ["b1/files.tar.zst", "b1/manifest.json"]);
    }

    #[test]
    fn links_and_unknown_files_are_refused_before_a_byte_is_sent() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("secret"), b"x").unwrap();
        let dir = tmp.path().join("b1");
        std::fs::create_dir(&dir).unwrap();
        std::os::unix::fs::symlink(tmp.path().join("secret"), dir.join("files.tar.zst")).unwrap();
        let m = manifest("b1", &[("files.tar.zst", 1)]);
        for file in [Some("files.tar.zst"), None] {
            let Err(e) = Download::open(&dir, &m, file) else {
                panic!("a symlink was opened");
            };
            assert!(e.is_refusal(), "{e}");
            assert!(
                e.to_string().starts_with("backup b1 cannot be downloaded"),
                "{e}"
            );
        }
        let Err(e) = Download::open(&dir, &m, Some("other")) else {
            panic!("an undeclared file was opened");
        };
        assert!(!e.is_refusal());
        assert_eq!(
            e.to_string(),
            "backup b1 has no file \"other\" (files: files.tar.zst, manifest.json)"
        );
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        let Err(e) = Download::open(&link, &m, None) else {
            panic!("a symlinked directory was opened");
        };
        assert!(e.is_refusal(), "{e}");
    }
}
