//! Archive engine for backups: standard tar streams, optionally zstd- or
//! gzip-compressed, created from and extracted to local paths.
//!
//! Synchronous and unaware of gRPC or the rest of the agent: callers run it
//! in `tokio::task::spawn_blocking`. Archives are plain tar that GNU tar
//! lists and extracts (`tar -xzf`, `tar -I zstd -xf`, `tar -xf`).

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::{self, File, FileTimes, Metadata, OpenOptions, Permissions};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use flate2::read::MultiGzDecoder;
use gzp::deflate::Mgzip;
use gzp::par::compress::{ParCompress, ParCompressBuilder};
use gzp::{GzpError, ZWriter};
use tar::{EntryType, Header};

use crate::files::safe::{self, Dir};
use crate::host::users;

/// Size of file reads, archive writes and decompressed reads.
const IO_CHUNK: usize = 1 << 20;
/// How much progress accumulates between two `on_bytes` calls.
const REPORT_EVERY: u64 = 1 << 20;
/// zstd CLI default level.
const ZSTD_LEVEL: i32 = 3;
/// gzip CLI default level; libdeflate's level 6 is smaller than zlib's.
const GZIP_LEVEL: u32 = 6;
/// Each gzip block is compressed independently (one gzip member each) on
/// its own core; 1 MiB keeps the ratio within a fraction of a percent of a
/// single stream while giving every core plenty of work.
const GZIP_BLOCK: usize = 1 << 20;
const TAR_BLOCK: u64 = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Zstd,
    Gzip,
    None,
}

impl Compression {
    /// File name extension for archives of this kind.
    pub fn extension(self) -> &'static str {
        match self {
            Compression::Zstd => "tar.zst",
            Compression::Gzip => "tar.gz",
            Compression::None => "tar",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Compression::Zstd => "zstd",
            Compression::Gzip => "gzip",
            Compression::None => "none",
        }
    }

    /// Inverse of [`Compression::as_str`], ignoring ASCII case.
    pub fn parse(s: &str) -> Option<Self> {
        [Compression::Zstd, Compression::Gzip, Compression::None]
            .into_iter()
            .find(|c| c.as_str().eq_ignore_ascii_case(s))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("refusing archive entry {entry:?}: {why}")]
    Unsafe { entry: String, why: String },
    #[error("archive {} is corrupt: {why}", archive.display())]
    Corrupt { archive: PathBuf, why: String },
    #[error("no space left on the backup disk writing {}", path.display())]
    NoSpace { path: PathBuf },
    #[error(
        "{} unpacks to {needed} bytes (apparent size, sparse files counted in full) but {} has only {free} bytes free: free space there or refuse this archive",
        archive.display(),
        target.display()
    )]
    TooLarge {
        archive: PathBuf,
        needed: u64,
        free: u64,
        target: PathBuf,
    },
    #[error("archive operation canceled")]
    Canceled,
}

/// Progress reporting and cancellation for a long archive operation.
pub struct Progress<'a> {
    /// Called with the total uncompressed file bytes processed so far,
    /// about every MiB and once at the end.
    pub on_bytes: &'a (dyn Fn(u64) + Sync),
    /// Checked between files and between chunks of a file.
    pub cancel: &'a AtomicBool,
}

impl Progress<'static> {
    /// No reporting and no cancellation.
    pub fn silent() -> Self {
        static NEVER: AtomicBool = AtomicBool::new(false);
        Progress {
            on_bytes: &|_| {},
            cancel: &NEVER,
        }
    }
}

/// `files` counts archive entries (regular files, directories, symlinks);
/// `uncompressed_bytes` counts regular file contents.
#[derive(Debug, Clone, Default)]
pub struct ArchiveStats {
    pub files: u64,
    pub uncompressed_bytes: u64,
    pub compressed_bytes: u64,
}

/// Bytes and entries under `source` (file or directory), without following symlinks: for free-space preflight and progress totals.
pub fn measure(source: &Path) -> Result<ArchiveStats, ArchiveError> {
    let mut stats = ArchiveStats::default();
    walk(source, &mut |node| {
        match Kind::of(node.meta) {
            Kind::File => {
                stats.files += 1;
                stats.uncompressed_bytes += node.meta.len();
            }
            Kind::Dir | Kind::Symlink => stats.files += 1,
            Kind::Unsupported(_) => {}
        }
        Ok(())
    })?;
    Ok(stats)
}

/// Archives `source` (a directory or a single file) into the file `dest` (created, must not exist), with entries rooted at the source's file name: /opt/covet/app -> "app/", "app/x.py", ...; /etc/covet/production.env -> "production.env".
/// Preserves modes, uid/gid (numeric and names), mtimes, symlinks (as symlinks, not followed), hard links are fine as copies; skips sockets with a tracing::warn; includes empty dirs. The file is fsynced before returning. Returns stats (compressed_bytes = final file size).
///
/// Also skips FIFOs and devices (with a warning), which [`extract`] refuses.
/// `dest` is created with mode 0600 (backups hold secrets). On any error,
/// including cancellation, `dest` is removed before returning.
pub fn create(
    source: &Path,
    dest: &Path,
    compression: Compression,
    progress: &Progress,
) -> Result<ArchiveStats, ArchiveError> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dest)
        .map_err(dest_error(dest))?;
    let result = write_archive(source, dest, file, compression, progress);
    if result.is_err() {
        // Best effort: the original error matters more than a failed cleanup.
        let _ = fs::remove_file(dest);
    }
    result
}

/// Reads the whole archive (decompressing, walking every entry and reading every byte) without writing anything: for verify.
///
/// Uncompressed archives only carry header checksums, so damage inside file
/// contents is detected only for zstd (content checksum) and gzip (CRC32).
pub fn test_read(
    archive: &Path,
    compression: Compression,
    progress: &Progress,
) -> Result<ArchiveStats, ArchiveError> {
    let mut buf = vec![0; IO_CHUNK];
    for_each_entry(archive, compression, progress, &mut |entry, meter| {
        let name = entry_name(entry);
        copy_entry_body(
            entry,
            &mut io::sink(),
            &mut buf,
            meter,
            archive,
            &name,
            Path::new(""),
        )
    })
}

// ---------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> ArchiveError + '_ {
    move |source| ArchiveError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Errors writing the archive: a full disk gets its own variant.
fn dest_error(dest: &Path) -> impl FnOnce(io::Error) -> ArchiveError + '_ {
    move |source| match source.raw_os_error() {
        Some(libc::ENOSPC | libc::EDQUOT) => ArchiveError::NoSpace {
            path: dest.to_path_buf(),
        },
        _ => ArchiveError::Io {
            path: dest.to_path_buf(),
            source,
        },
    }
}

/// Errors reading an archive: OS errors are I/O trouble, anything else was
/// raised by a decoder or the tar parser about the bytes themselves.
fn archive_error(archive: &Path) -> impl FnOnce(io::Error) -> ArchiveError + '_ {
    move |source| match source.raw_os_error() {
        Some(_) => ArchiveError::Io {
            path: archive.to_path_buf(),
            source,
        },
        None => corrupt(archive, source.to_string()),
    }
}

fn corrupt(archive: &Path, why: impl Into<String>) -> ArchiveError {
    ArchiveError::Corrupt {
        archive: archive.to_path_buf(),
        why: why.into(),
    }
}

fn gzp_to_io(error: GzpError) -> io::Error {
    match error {
        GzpError::Io(error) => error,
        other => io::Error::other(other),
    }
}

fn worker_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Counts processed bytes, reports them every [`REPORT_EVERY`] and checks
/// for cancellation.
struct Meter<'p, 'a> {
    progress: &'p Progress<'a>,
    stats: ArchiveStats,
    reported: u64,
}

impl<'p, 'a> Meter<'p, 'a> {
    fn new(progress: &'p Progress<'a>) -> Self {
        Meter {
            progress,
            stats: ArchiveStats::default(),
            reported: 0,
        }
    }

    fn add_bytes(&mut self, n: u64) {
        self.stats.uncompressed_bytes += n;
        if self.stats.uncompressed_bytes - self.reported >= REPORT_EVERY {
            self.report();
        }
    }

    fn report(&mut self) {
        self.reported = self.stats.uncompressed_bytes;
        (self.progress.on_bytes)(self.reported);
    }

    fn check_cancel(&self) -> Result<(), ArchiveError> {
        if self.progress.cancel.load(Ordering::Relaxed) {
            Err(ArchiveError::Canceled)
        } else {
            Ok(())
        }
    }

    fn finish(mut self) -> ArchiveStats {
        self.report();
        self.stats
    }
}

// ---------------------------------------------------------------------------
// Walking the source tree
// ---------------------------------------------------------------------------

enum Kind {
    File,
    Dir,
    Symlink,
    Unsupported(&'static str),
}

impl Kind {
    fn of(meta: &Metadata) -> Kind {
        let ft = meta.file_type();
        if ft.is_file() {
            Kind::File
        } else if ft.is_dir() {
            Kind::Dir
        } else if ft.is_symlink() {
            Kind::Symlink
        } else if ft.is_socket() {
            Kind::Unsupported("socket")
        } else if ft.is_fifo() {
            Kind::Unsupported("FIFO")
        } else {
            Kind::Unsupported("device")
        }
    }
}

/// One filesystem object under the source, with its name in the archive.
struct Node<'n> {
    disk: &'n Path,
    name: &'n Path,
    meta: &'n Metadata,
}

/// Visits `source` and everything under it, parents before children and
/// siblings in name order, without following symlinks.
fn walk(
    source: &Path,
    visit: &mut dyn FnMut(&Node) -> Result<(), ArchiveError>,
) -> Result<(), ArchiveError> {
    let name = source.file_name().ok_or_else(|| ArchiveError::Io {
        path: source.to_path_buf(),
        source: io::Error::new(io::ErrorKind::InvalidInput, "source has no file name"),
    })?;
    let meta = fs::symlink_metadata(source).map_err(io_at(source))?;
    walk_tree(source, Path::new(name), &meta, visit)
}

fn walk_tree(
    disk: &Path,
    name: &Path,
    meta: &Metadata,
    visit: &mut dyn FnMut(&Node) -> Result<(), ArchiveError>,
) -> Result<(), ArchiveError> {
    visit(&Node { disk, name, meta })?;
    if !meta.is_dir() {
        return Ok(());
    }
    for child in sorted_children(disk)? {
        let child_disk = disk.join(&child);
        match fs::symlink_metadata(&child_disk) {
            Ok(child_meta) => walk_tree(&child_disk, &name.join(&child), &child_meta, visit)?,
            // Live applications delete temporary files while we walk.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                tracing::warn!(path = %child_disk.display(), "vanished while archiving; skipped");
            }
            Err(e) => return Err(io_at(&child_disk)(e)),
        }
    }
    Ok(())
}

fn sorted_children(dir: &Path) -> Result<Vec<std::ffi::OsString>, ArchiveError> {
    let mut names = fs::read_dir(dir)
        .and_then(|entries| {
            entries
                .map(|entry| entry.map(|e| e.file_name()))
                .collect::<io::Result<Vec<_>>>()
        })
        .map_err(io_at(dir))?;
    names.sort();
    Ok(names)
}

// ---------------------------------------------------------------------------
// Creating archives
// ---------------------------------------------------------------------------

fn write_archive(
    source: &Path,
    dest: &Path,
    file: File,
    compression: Compression,
    progress: &Progress,
) -> Result<ArchiveStats, ArchiveError> {
    let dest_id = file
        .metadata()
        .map(|m| (m.dev(), m.ino()))
        .map_err(io_at(dest))?;
    let sink = Sink::new(file, compression).map_err(dest_error(dest))?;
    let mut writer = ArchiveWriter {
        builder: tar::Builder::new(sink),
        dest,
        dest_id,
        meter: Meter::new(progress),
        owners: OwnerNames::default(),
        buf: vec![0; IO_CHUNK],
    };
    walk(source, &mut |node| writer.append(node))?;
    writer.finish()
}

/// The compressed output stream.
enum Sink {
    Plain(BufWriter<File>),
    Zstd(zstd::Encoder<'static, BufWriter<File>>),
    Gzip(ParGzip),
}

impl Sink {
    fn new(file: File, compression: Compression) -> io::Result<Sink> {
        Ok(match compression {
            Compression::None => Sink::Plain(BufWriter::with_capacity(IO_CHUNK, file)),
            Compression::Zstd => {
                let out = BufWriter::with_capacity(IO_CHUNK, file);
                let mut encoder = zstd::Encoder::new(out, ZSTD_LEVEL)?;
                encoder.multithread(u32::try_from(worker_threads()).unwrap_or(1))?;
                // Like the zstd CLI: lets test_read catch damaged contents.
                encoder.include_checksum(true)?;
                Sink::Zstd(encoder)
            }
            Compression::Gzip => Sink::Gzip(ParGzip::new(file)?),
        })
    }

    /// Flushes every layer and hands back the file.
    fn finish(self) -> io::Result<File> {
        match self {
            Sink::Plain(out) => out.into_inner().map_err(|e| e.into_error()),
            Sink::Zstd(encoder) => encoder.finish()?.into_inner().map_err(|e| e.into_error()),
            Sink::Gzip(gzip) => gzip.finish(),
        }
    }
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sink::Plain(out) => out.write(buf),
            Sink::Zstd(out) => out.write(buf),
            Sink::Gzip(out) => out.write(buf),
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            Sink::Plain(out) => out.write_all(buf),
            Sink::Zstd(out) => out.write_all(buf),
            Sink::Gzip(out) => out.write_all(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sink::Plain(out) => out.flush(),
            Sink::Zstd(out) => out.flush(),
            Sink::Gzip(out) => out.flush(),
        }
    }
}

/// Parallel gzip (libdeflate, one gzip member per block, which `gzip -d`
/// reads as one stream).
///
/// `ParCompress` finishes itself on drop and panics if that fails, so this
/// wrapper finishes it quietly on error paths and never finishes it twice.
struct ParGzip {
    inner: ParCompress<'static, Mgzip, File>,
    live: bool,
}

impl ParGzip {
    fn new(file: File) -> io::Result<ParGzip> {
        let inner = ParCompressBuilder::<Mgzip>::new()
            .num_threads(worker_threads())
            .and_then(|b| b.buffer_size(GZIP_BLOCK))
            .map_err(gzp_to_io)?
            .compression_level(gzp::Compression::new(GZIP_LEVEL))
            .from_writer(file);
        Ok(ParGzip { inner, live: true })
    }

    fn finish(mut self) -> io::Result<File> {
        self.live = false;
        self.inner.finish().map_err(gzp_to_io)
    }

    /// A failed write has already torn the pipeline down.
    fn track<T>(&mut self, result: io::Result<T>) -> io::Result<T> {
        if result.is_err() {
            self.live = false;
        }
        result
    }
}

impl Write for ParGzip {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let result = self.inner.write(buf);
        self.track(result)
    }

    fn flush(&mut self) -> io::Result<()> {
        let result = self.inner.flush();
        self.track(result)
    }
}

impl Drop for ParGzip {
    fn drop(&mut self) {
        if self.live {
            let _ = self.inner.finish();
        }
    }
}

struct ArchiveWriter<'p, 'a> {
    builder: tar::Builder<Sink>,
    dest: &'p Path,
    /// Device and inode of `dest`, so a destination inside the source is
    /// not archived into itself.
    dest_id: (u64, u64),
    meter: Meter<'p, 'a>,
    owners: OwnerNames,
    buf: Vec<u8>,
}

impl ArchiveWriter<'_, '_> {
    fn append(&mut self, node: &Node) -> Result<(), ArchiveError> {
        self.meter.check_cancel()?;
        if (node.meta.dev(), node.meta.ino()) == self.dest_id {
            return Ok(());
        }
        let appended = match Kind::of(node.meta) {
            Kind::File => self.append_file(node)?,
            Kind::Dir => self.append_dir(node)?,
            Kind::Symlink => self.append_symlink(node)?,
            Kind::Unsupported(what) => {
                tracing::warn!(path = %node.disk.display(), "skipping {what}: not archivable");
                false
            }
        };
        if appended {
            self.meter.stats.files += 1;
        }
        Ok(())
    }

    fn append_dir(&mut self, node: &Node) -> Result<bool, ArchiveError> {
        let mut header = self.header(node.meta, EntryType::Directory);
        // A trailing slash, as GNU tar writes directory names.
        let name = node.name.join("");
        self.builder
            .append_data(&mut header, name, io::empty())
            .map_err(dest_error(self.dest))?;
        Ok(true)
    }

    fn append_symlink(&mut self, node: &Node) -> Result<bool, ArchiveError> {
        let target = fs::read_link(node.disk).map_err(io_at(node.disk))?;
        let mut header = self.header(node.meta, EntryType::Symlink);
        self.builder
            .append_link(&mut header, node.name, target)
            .map_err(dest_error(self.dest))?;
        Ok(true)
    }

    fn append_file(&mut self, node: &Node) -> Result<bool, ArchiveError> {
        let mut file = match File::open(node.disk) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                tracing::warn!(path = %node.disk.display(), "vanished while archiving; skipped");
                return Ok(false);
            }
            Err(e) => return Err(io_at(node.disk)(e)),
        };
        // Metadata of what was opened, in case the path was replaced.
        let meta = file.metadata().map_err(io_at(node.disk))?;
        let mut header = self.header(&meta, EntryType::Regular);
        header.set_size(meta.len());
        // The header (and any long-name entry) goes through the builder; the
        // body is streamed below in large chunks, which is what the size in
        // the header promises.
        self.builder
            .append_data(&mut header, node.name, io::empty())
            .map_err(dest_error(self.dest))?;
        self.stream_body(&mut file, meta.len(), node.disk)?;
        Ok(true)
    }

    /// Writes exactly `size` bytes of `file` plus the tar padding: a file
    /// that shrank meanwhile is padded with zeros, one that grew is cut.
    fn stream_body(&mut self, file: &mut File, size: u64, path: &Path) -> Result<(), ArchiveError> {
        let mut left = size;
        while left > 0 {
            self.meter.check_cancel()?;
            let want = usize::try_from(left).map_or(IO_CHUNK, |l| l.min(IO_CHUNK));
            let n = read_retrying(file, &mut self.buf[..want]).map_err(io_at(path))?;
            if n == 0 {
                tracing::warn!(path = %path.display(), "file shrank while archiving; padded with zeros");
                self.buf[..want].fill(0);
            }
            let chunk = if n == 0 { want } else { n };
            self.builder
                .get_mut()
                .write_all(&self.buf[..chunk])
                .map_err(dest_error(self.dest))?;
            left -= chunk as u64;
            self.meter.add_bytes(chunk as u64);
        }
        let padding = (TAR_BLOCK - size % TAR_BLOCK) % TAR_BLOCK;
        self.builder
            .get_mut()
            .write_all(&[0; TAR_BLOCK as usize][..padding as usize])
            .map_err(dest_error(self.dest))
    }

    fn header(&mut self, meta: &Metadata, kind: EntryType) -> Header {
        let mut header = Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(meta.mode() & 0o7777);
        header.set_uid(meta.uid().into());
        header.set_gid(meta.gid().into());
        header.set_mtime(u64::try_from(meta.mtime()).unwrap_or(0));
        header.set_size(0);
        // Names too long for the header are left out: the ids remain.
        if let Some(user) = self.owners.user(meta.uid()) {
            let _ = header.set_username(user);
        }
        if let Some(group) = self.owners.group(meta.gid()) {
            let _ = header.set_groupname(group);
        }
        header
    }

    fn finish(self) -> Result<ArchiveStats, ArchiveError> {
        let dest = self.dest;
        let sink = self.builder.into_inner().map_err(dest_error(dest))?;
        let file = sink.finish().map_err(dest_error(dest))?;
        file.sync_all().map_err(dest_error(dest))?;
        let size = file.metadata().map_err(io_at(dest))?.len();
        let mut stats = self.meter.finish();
        stats.compressed_bytes = size;
        Ok(stats)
    }
}

fn read_retrying(reader: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match reader.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

/// User and group names by id, looked up once each.
#[derive(Default)]
struct OwnerNames {
    users: HashMap<u32, Option<String>>,
    groups: HashMap<u32, Option<String>>,
}

impl OwnerNames {
    fn user(&mut self, uid: u32) -> Option<&str> {
        self.users
            .entry(uid)
            .or_insert_with(|| users::name_of(uid))
            .as_deref()
    }

    fn group(&mut self, gid: u32) -> Option<&str> {
        self.groups
            .entry(gid)
            .or_insert_with(|| users::group_name_of(gid))
            .as_deref()
    }
}

// ---------------------------------------------------------------------------
// Reading archives
// ---------------------------------------------------------------------------

type ArchiveReader = Box<dyn Read>;
type ArchiveEntry<'a> = tar::Entry<'a, ArchiveReader>;

fn open_archive(archive: &Path, compression: Compression) -> Result<ArchiveReader, ArchiveError> {
    let file = File::open(archive).map_err(io_at(archive))?;
    let compressed = BufReader::with_capacity(IO_CHUNK, file);
    let decoded: ArchiveReader = match compression {
        Compression::None => Box::new(compressed),
        Compression::Zstd => {
            Box::new(zstd::Decoder::with_buffer(compressed).map_err(archive_error(archive))?)
        }
        // Multi-member: ours writes one gzip member per block.
        Compression::Gzip => Box::new(MultiGzDecoder::new(compressed)),
    };
    // tar reads 512-byte headers: batch them into large decoder calls.
    Ok(match compression {
        Compression::None => decoded,
        _ => Box::new(BufReader::with_capacity(IO_CHUNK, decoded)),
    })
}

/// Calls `visit` on every entry of the archive, then reads the rest of the
/// stream so the decoder checks its trailer and truncation is noticed.
fn for_each_entry(
    archive: &Path,
    compression: Compression,
    progress: &Progress,
    visit: &mut dyn FnMut(&mut ArchiveEntry, &mut Meter) -> Result<(), ArchiveError>,
) -> Result<ArchiveStats, ArchiveError> {
    let mut meter = Meter::new(progress);
    let mut tar = tar::Archive::new(open_archive(archive, compression)?);
    for entry in tar.entries().map_err(archive_error(archive))? {
        meter.check_cancel()?;
        let mut entry = entry.map_err(archive_error(archive))?;
        visit(&mut entry, &mut meter)?;
        meter.stats.files += 1;
    }
    check_end_of_archive(archive, &mut tar.into_inner())?;
    Ok(meter.finish())
}

/// The tar parser stops at the first zero block, or silently at EOF; a
/// complete archive has a second zero block after the first.
fn check_end_of_archive(archive: &Path, rest: &mut dyn Read) -> Result<(), ArchiveError> {
    let trailing = io::copy(rest, &mut io::sink()).map_err(archive_error(archive))?;
    if trailing < TAR_BLOCK {
        return Err(corrupt(
            archive,
            "the end-of-archive marker is missing: the archive is truncated",
        ));
    }
    Ok(())
}

fn entry_name(entry: &ArchiveEntry) -> String {
    String::from_utf8_lossy(&entry.path_bytes()).into_owned()
}

/// Copies an entry's contents to `out` (at `out_path`), counting progress,
/// and checks that the archive held as many bytes as the header promised.
fn copy_entry_body(
    entry: &mut ArchiveEntry,
    out: &mut dyn Write,
    buf: &mut [u8],
    meter: &mut Meter,
    archive: &Path,
    name: &str,
    out_path: &Path,
) -> Result<(), ArchiveError> {
    let expected = entry.size();
    let sparse = entry.header().entry_type().is_gnu_sparse();
    let mut copied = 0u64;
    loop {
        meter.check_cancel()?;
        let n = read_retrying(entry, buf).map_err(archive_error(archive))?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n]).map_err(io_at(out_path))?;
        copied += n as u64;
        meter.add_bytes(n as u64);
    }
    if copied != expected && !sparse {
        return Err(corrupt(
            archive,
            format!(
                "entry {name:?} holds {copied} of its {expected} bytes: the archive is truncated"
            ),
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Extracting
// ---------------------------------------------------------------------------

/// How extracted objects are owned.
#[derive(Debug, Clone, Copy, Default)]
pub struct ExtractOptions {
    /// Every object gets this uid/gid instead of the archive's, and
    /// setuid/setgid bits are dropped (release artifacts: built elsewhere,
    /// owned by the app's user). `None`: the archive's ids when root
    /// (backups, which restore what was there).
    pub owner: Option<(u32, u32)>,
    /// The apparent size of the entries as recorded when the archive was
    /// made (a backup's checksummed manifest). It is checked against free
    /// space up front instead of reading the whole archive twice; while
    /// extracting, the free space itself is then the budget.
    pub known_size: Option<u64>,
}

/// Sum of the apparent sizes of every entry (a sparse entry counts its full
/// logical size): what an extraction may write at most. Reads the whole
/// stream, headers only, without writing anything.
pub fn apparent_size(
    archive: &Path,
    compression: Compression,
    progress: &Progress,
) -> Result<u64, ArchiveError> {
    let mut total = 0u64;
    let mut tar = tar::Archive::new(open_archive(archive, compression)?);
    for entry in tar.entries().map_err(archive_error(archive))? {
        if progress.cancel.load(Ordering::Relaxed) {
            return Err(ArchiveError::Canceled);
        }
        let entry = entry.map_err(archive_error(archive))?;
        total = total.saturating_add(entry.size());
    }
    Ok(total)
}

/// [`extract_into`] a directory opened from its path (whose last component
/// must not be a symlink), owned as the archive says.
pub fn extract(
    archive: &Path,
    compression: Compression,
    staging: &Path,
    progress: &Progress,
) -> Result<ArchiveStats, ArchiveError> {
    let dir = Dir::open(staging).map_err(io_at(staging))?;
    extract_into(
        archive,
        compression,
        &dir,
        staging,
        ExtractOptions::default(),
        progress,
    )
}

/// Extracts `archive` into the open directory `staging` (shown as
/// `staging_path` in messages). First the budget: the apparent size of all
/// entries must fit in the free space of `staging`'s file system, or
/// nothing is written. Then every entry is created relative to `staging`'s
/// descriptor (never through a symlink, even one swapped in meanwhile),
/// refusing — before writing anything outside `staging` and failing the
/// whole extraction — any entry that has an absolute path, contains `..`,
/// is a device or FIFO, is a hard link whose target escapes `staging`, or
/// whose path goes through a symlink extracted earlier (symlinks themselves
/// are restored verbatim, wherever they point). Attributes are set on open
/// descriptors; holes of sparse entries stay holes. Modes keep setuid bits
/// only when root and no `owner` is imposed. Returns once the tree is on
/// disk (one `syncfs` at the end).
///
/// On error `staging` holds a partial tree: the caller removes it.
pub fn extract_into(
    archive: &Path,
    compression: Compression,
    staging: &Dir,
    staging_path: &Path,
    options: ExtractOptions,
    progress: &Progress,
) -> Result<ArchiveStats, ArchiveError> {
    let free = staging.free_bytes().map_err(io_at(staging_path))?;
    let needed = match options.known_size {
        Some(known) => known,
        None => apparent_size(archive, compression, progress)?,
    };
    if needed > free {
        return Err(ArchiveError::TooLarge {
            archive: archive.to_path_buf(),
            needed,
            free,
            target: staging_path.to_path_buf(),
        });
    }
    // A recorded size is a promise of the agent that wrote it; the running
    // check then only keeps the disk from filling.
    let budget = if options.known_size.is_some() {
        free
    } else {
        needed
    };
    let mut extractor = Extractor::new(archive, staging, staging_path, options, budget)?;
    let stats = for_each_entry(archive, compression, progress, &mut |entry, meter| {
        extractor.extract_entry(entry, meter)
    })?;
    extractor.apply_dir_attrs()?;
    // One sync for the whole tree instead of one per file: the caller swaps
    // it in next, and a crash after the swap must not leave empty files.
    staging.sync_filesystem().map_err(io_at(staging_path))?;
    Ok(stats)
}

/// Metadata to restore on an extracted object.
#[derive(Clone, Copy)]
struct Attrs {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: SystemTime,
}

impl Attrs {
    fn of(header: &Header, archive: &Path, name: &str) -> Result<Attrs, ArchiveError> {
        let bad = |what: &str| corrupt(archive, format!("entry {name:?} has an invalid {what}"));
        let id = |value: io::Result<u64>, what: &str| {
            value
                .ok()
                .and_then(|v| u32::try_from(v).ok())
                .ok_or_else(|| bad(what))
        };
        let mtime = header.mtime().map_err(|_| bad("mtime"))?;
        Ok(Attrs {
            mode: header.mode().map_err(|_| bad("mode"))?,
            uid: id(header.uid(), "uid")?,
            gid: id(header.gid(), "gid")?,
            mtime: UNIX_EPOCH + Duration::from_secs(mtime.min(i64::MAX as u64)),
        })
    }
}

struct Extractor<'x> {
    archive: &'x Path,
    root: &'x Dir,
    staging: &'x Path,
    as_root: bool,
    options: ExtractOptions,
    /// Apparent bytes the budget allows, and those written so far.
    budget: u64,
    written: u64,
    /// Symlinks created so far, by path relative to staging, with targets.
    symlinks: HashMap<PathBuf, PathBuf>,
    /// Directories get their mode and mtime last: adding entries changes
    /// mtimes, and a read-only mode would block adding them.
    dirs: Vec<(PathBuf, Attrs)>,
    /// Parents seen, when an owner is imposed.
    implied_dirs: std::collections::HashSet<PathBuf>,
    /// The staging root, shared with entries right under it.
    root_dir: Rc<Dir>,
    /// Open descriptors of the directories on the last parent's path, one
    /// per component: archives list a directory's entries together, so most
    /// entries reuse them instead of walking down from the root again.
    chain: Vec<(OsString, Rc<Dir>)>,
    buf: Vec<u8>,
}

impl<'x> Extractor<'x> {
    fn new(
        archive: &'x Path,
        root: &'x Dir,
        staging: &'x Path,
        options: ExtractOptions,
        budget: u64,
    ) -> Result<Self, ArchiveError> {
        Ok(Extractor {
            archive,
            root,
            staging,
            as_root: crate::files::is_root(),
            options,
            budget,
            written: 0,
            symlinks: HashMap::new(),
            dirs: Vec::new(),
            implied_dirs: std::collections::HashSet::new(),
            root_dir: Rc::new(root.try_clone().map_err(io_at(staging))?),
            chain: Vec::new(),
            buf: vec![0; IO_CHUNK],
        })
    }

    fn extract_entry(
        &mut self,
        entry: &mut ArchiveEntry,
        meter: &mut Meter,
    ) -> Result<(), ArchiveError> {
        let name = entry_name(entry);
        let refuse = |why: String| ArchiveError::Unsafe {
            entry: name.clone(),
            why,
        };
        let kind = entry.header().entry_type();
        if kind.is_character_special() || kind.is_block_special() || kind.is_fifo() {
            return Err(refuse("devices and FIFOs are never restored".into()));
        }
        let rel = inside_path(&entry.path_bytes()).map_err(refuse)?;
        if rel.as_os_str().is_empty() {
            // The archive root itself ("./"): staging stands for it.
            return Ok(());
        }
        self.refuse_through_symlink(&rel).map_err(refuse)?;
        let mut attrs = Attrs::of(entry.header(), self.archive, &name)?;
        if let Some((uid, gid)) = self.options.owner {
            attrs.uid = uid;
            attrs.gid = gid;
        }
        match kind {
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                self.extract_file(entry, meter, &rel, attrs, &name)
            }
            EntryType::Directory => self.extract_dir(&rel, attrs),
            EntryType::Symlink => {
                let target = link_target(entry, self.archive, &name)?;
                self.check_symlink_target(&rel, &target).map_err(refuse)?;
                self.extract_symlink(&rel, &target, attrs)
            }
            EntryType::Link => {
                let target = link_target(entry, self.archive, &name)?;
                let target = inside_path(target.as_os_str().as_bytes())
                    .map_err(|why| refuse(format!("hard link target: {why}")))?;
                self.refuse_through_symlink(&target)
                    .map_err(|why| refuse(format!("hard link target: {why}")))?;
                self.extract_hard_link(&rel, &target)
                    .map_err(refuse_on_unsafe(&name))
            }
            other => Err(refuse(format!("unsupported entry type {other:?}"))),
        }
    }

    fn refuse_through_symlink(&self, rel: &Path) -> Result<(), String> {
        match rel
            .ancestors()
            .skip(1)
            .find(|a| self.symlinks.contains_key(*a))
        {
            Some(link) => Err(format!(
                "its path goes through the symlink {}",
                link.display()
            )),
            None => Ok(()),
        }
    }

    /// Symlinks are restored as they were, wherever they point (a
    /// virtualenv's `bin/python3 -> /usr/bin/python3` must come back): they
    /// are inert here, because extraction never follows one. Every later
    /// entry whose path goes through a symlink is refused, every object is
    /// created relative to its parent's descriptor with `O_NOFOLLOW |
    /// O_EXCL` (the parent reached without symlinks), and an earlier entry
    /// of the same name is removed, never followed. Only an empty target is
    /// refused.
    fn check_symlink_target(&self, _rel: &Path, target: &Path) -> Result<(), String> {
        if target.as_os_str().is_empty() {
            return Err("empty symlink target".into());
        }
        Ok(())
    }

    /// The open parent directory of `rel` (created as needed) and its name.
    fn parent_of<'r>(
        &mut self,
        rel: &'r Path,
    ) -> Result<(Rc<Dir>, &'r std::ffi::OsStr), ArchiveError> {
        let path = self.staging.join(rel);
        let name = rel.file_name().ok_or_else(|| ArchiveError::Unsafe {
            entry: rel.display().to_string(),
            why: "no file name".into(),
        })?;
        let parent = rel.parent().unwrap_or(Path::new(""));
        let dir = self.open_parent(parent).map_err(io_at(&path))?;
        if let Some((uid, gid)) = self.options.owner {
            // Directories the archive implies without listing them belong
            // to the imposed owner too (listed ones are applied later).
            for implied in parent.ancestors().filter(|a| !a.as_os_str().is_empty()) {
                if self.implied_dirs.insert(implied.to_path_buf()) {
                    let attrs = Attrs {
                        mode: 0o755,
                        uid,
                        gid,
                        mtime: SystemTime::now(),
                    };
                    self.dirs.insert(0, (implied.to_path_buf(), attrs));
                }
            }
        }
        Ok((dir, name))
    }

    /// The directory `parent` (relative to the root), created as needed:
    /// reuses the descriptors of the common start of the last parent's path
    /// and opens the rest one component at a time, `O_NOFOLLOW |
    /// O_DIRECTORY` (a symlink on the way is never followed). A cached
    /// descriptor stays the directory it was opened as, whatever is renamed
    /// later; removed directories are dropped from the chain.
    fn open_parent(&mut self, parent: &Path) -> io::Result<Rc<Dir>> {
        let mut parts = Vec::new();
        for component in parent.components() {
            match component {
                Component::Normal(part) => parts.push(part),
                Component::CurDir => {}
                _ => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("{} leaves its directory", parent.display()),
                    ));
                }
            }
        }
        let common = self
            .chain
            .iter()
            .zip(&parts)
            .take_while(|((have, _), want)| have.as_os_str() == **want)
            .count();
        self.chain.truncate(common);
        for part in &parts[common..] {
            let base = self.chain.last().map_or(&self.root_dir, |(_, dir)| dir);
            let dir = match base.open_dir(part) {
                Ok(dir) => dir,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    match base.mkdir(part, 0o777) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                        Err(e) => return Err(e),
                    }
                    base.open_dir(part)?
                }
                Err(e) => return Err(e),
            };
            self.chain.push(((*part).to_owned(), Rc::new(dir)));
        }
        Ok(self
            .chain
            .last()
            .map_or_else(|| self.root_dir.clone(), |(_, dir)| dir.clone()))
    }

    /// Drops the cached descriptors at and below the directory `rel`.
    fn forget_dir(&mut self, rel: &Path) {
        let mut depth = 0;
        for component in rel.components() {
            match self.chain.get(depth) {
                Some((name, _)) if component.as_os_str() == name.as_os_str() => depth += 1,
                _ => return,
            }
        }
        if depth > 0 {
            self.chain.truncate(depth - 1);
        }
    }

    /// Creates the object `name` in `parent` with `create`; when an earlier
    /// entry holds the name, removes it (never following it) and tries once
    /// more. Trying first saves a `stat` per entry.
    fn create_in_slot<T>(
        &mut self,
        rel: &Path,
        parent: &Dir,
        name: &std::ffi::OsStr,
        create: impl Fn(&Dir, &std::ffi::OsStr) -> io::Result<T>,
    ) -> Result<T, ArchiveError> {
        let path = self.staging.join(rel);
        match create(parent, name) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                self.clear_slot(rel, parent, name)?;
                create(parent, name).map_err(io_at(&path))
            }
            other => other.map_err(io_at(&path)),
        }
    }

    fn charge(&mut self, bytes: u64) -> Result<(), ArchiveError> {
        self.written = self.written.saturating_add(bytes);
        if self.written > self.budget {
            return Err(ArchiveError::TooLarge {
                archive: self.archive.to_path_buf(),
                needed: self.written,
                free: self.budget,
                target: self.staging.to_path_buf(),
            });
        }
        Ok(())
    }

    fn extract_file(
        &mut self,
        entry: &mut ArchiveEntry,
        meter: &mut Meter,
        rel: &Path,
        attrs: Attrs,
        name: &str,
    ) -> Result<(), ArchiveError> {
        self.charge(entry.size())?;
        let path = self.staging.join(rel);
        let (parent, file_name) = self.parent_of(rel)?;
        let mut out = self.create_in_slot(rel, &parent, file_name, |dir, name| {
            dir.create_file(name, 0o600)
        })?;
        let sparse = entry.header().entry_type().is_gnu_sparse();
        let size = entry.size();
        let mut buf = std::mem::take(&mut self.buf);
        let copied = if sparse {
            let mut holes = HoleWriter::new(&mut out);
            copy_entry_body(
                entry,
                &mut holes,
                &mut buf,
                meter,
                self.archive,
                name,
                &path,
            )
            .and_then(|()| holes.finish(size).map_err(io_at(&path)))
        } else {
            copy_entry_body(entry, &mut out, &mut buf, meter, self.archive, name, &path)
        };
        self.buf = buf;
        copied?;
        self.apply_attrs(&out, attrs).map_err(io_at(&path))
    }

    fn extract_dir(&mut self, rel: &Path, attrs: Attrs) -> Result<(), ArchiveError> {
        let path = self.staging.join(rel);
        let (parent, name) = self.parent_of(rel)?;
        match parent.mkdir(name, 0o700) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let existing = parent.stat_at(name).map_err(io_at(&path))?;
                if !existing.as_ref().is_some_and(safe::is_dir) {
                    self.clear_slot(rel, &parent, name)?;
                    parent.mkdir(name, 0o700).map_err(io_at(&path))?;
                }
            }
            Err(e) => return Err(io_at(&path)(e)),
        }
        if self.options.owner.is_some() && !self.implied_dirs.insert(rel.to_path_buf()) {
            // Listed after a child implied it: the listed attributes win.
            self.dirs.retain(|(dir, _)| dir != rel);
        }
        self.dirs.push((rel.to_path_buf(), attrs));
        Ok(())
    }

    fn extract_symlink(
        &mut self,
        rel: &Path,
        target: &Path,
        attrs: Attrs,
    ) -> Result<(), ArchiveError> {
        let path = self.staging.join(rel);
        let (parent, name) = self.parent_of(rel)?;
        self.create_in_slot(rel, &parent, name, |dir, name| dir.symlink(target, name))?;
        self.symlinks
            .insert(rel.to_path_buf(), target.to_path_buf());
        if self.as_root {
            parent
                .lchown(name, attrs.uid, attrs.gid)
                .map_err(io_at(&path))?;
        }
        let secs = attrs
            .mtime
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        parent.set_mtime_nofollow(name, secs).map_err(io_at(&path))
    }

    /// Hard links are made to what this extraction already created; a link
    /// to a symlink is a second symlink, checked from its own directory.
    fn extract_hard_link(&mut self, rel: &Path, target: &Path) -> Result<(), LinkError> {
        let link_target = self.symlinks.get(target).cloned();
        if let Some(link_target) = &link_target {
            self.check_symlink_target(rel, link_target)
                .map_err(LinkError::Unsafe)?;
        }
        let path = self.staging.join(rel);
        let (parent, name) = self.parent_of(rel)?;
        let from_name = target
            .file_name()
            .ok_or_else(|| LinkError::Unsafe("the hard link has no target name".into()))?;
        let from = self
            .root
            .open_dir_beneath(target.parent().unwrap_or(Path::new("")))
            .map_err(|e| LinkError::Io(io_at(&path)(e)))?;
        self.create_in_slot(rel, &parent, name, |dir, name| {
            dir.hard_link(&from, from_name, name)
        })?;
        // Recorded once made: clearing the slot forgets what held the name.
        if let Some(link_target) = link_target {
            self.symlinks.insert(rel.to_path_buf(), link_target);
        }
        Ok(())
    }

    /// Makes room for a new object `name` in `parent`: removes an earlier
    /// entry of the same name (never following it).
    fn clear_slot(
        &mut self,
        rel: &Path,
        parent: &Dir,
        name: &std::ffi::OsStr,
    ) -> Result<(), ArchiveError> {
        let path = self.staging.join(rel);
        match parent.stat_at(name).map_err(io_at(&path))? {
            Some(st) if safe::is_dir(&st) => {
                self.dirs.retain(|(dir, _)| dir != rel);
                self.forget_dir(rel);
                parent.remove(name, true).map_err(io_at(&path))
            }
            Some(_) => {
                self.symlinks.remove(rel);
                parent.remove(name, false).map_err(io_at(&path))
            }
            None => Ok(()),
        }
    }

    fn apply_attrs(&self, file: &File, attrs: Attrs) -> io::Result<()> {
        // chown first: it clears setuid bits.
        if self.as_root {
            std::os::unix::fs::fchown(file, Some(attrs.uid), Some(attrs.gid))?;
        }
        let mask = if self.as_root && self.options.owner.is_none() {
            0o7777
        } else {
            0o1777
        };
        file.set_permissions(Permissions::from_mode(attrs.mode & mask))?;
        file.set_times(FileTimes::new().set_modified(attrs.mtime))
    }

    fn apply_dir_attrs(&self) -> Result<(), ArchiveError> {
        // Deepest first, so a read-only parent never blocks a child.
        for (rel, attrs) in self.dirs.iter().rev() {
            let path = self.staging.join(rel);
            self.root
                .open_dir_beneath(rel)
                .and_then(|dir| dir.as_file())
                .and_then(|dir| self.apply_attrs(&dir, *attrs))
                .map_err(io_at(&path))?;
        }
        Ok(())
    }
}

/// Writes a sparse entry's body, seeking over runs of zeros so that holes
/// stay holes; `finish` sets the final length (a trailing hole).
struct HoleWriter<'f> {
    file: &'f mut File,
    /// Zeros seen and not yet written: skipped by the next write's seek.
    pending: u64,
    at: u64,
}

impl<'f> HoleWriter<'f> {
    fn new(file: &'f mut File) -> Self {
        HoleWriter {
            file,
            pending: 0,
            at: 0,
        }
    }

    fn finish(self, size: u64) -> io::Result<()> {
        self.file.set_len(size)
    }
}

impl Write for HoleWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.iter().all(|&b| b == 0) {
            self.pending += buf.len() as u64;
            return Ok(buf.len());
        }
        if self.pending > 0 {
            self.at += self.pending;
            self.pending = 0;
            self.file.seek(SeekFrom::Start(self.at))?;
        }
        let n = self.file.write(buf)?;
        self.at += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// Hard-link extraction fails either on a hostile target or on I/O.
enum LinkError {
    Unsafe(String),
    Io(ArchiveError),
}

impl From<ArchiveError> for LinkError {
    fn from(error: ArchiveError) -> Self {
        LinkError::Io(error)
    }
}

fn refuse_on_unsafe(name: &str) -> impl FnOnce(LinkError) -> ArchiveError + '_ {
    move |error| match error {
        LinkError::Unsafe(why) => ArchiveError::Unsafe {
            entry: name.to_owned(),
            why,
        },
        LinkError::Io(error) => error,
    }
}

fn link_target(entry: &ArchiveEntry, archive: &Path, name: &str) -> Result<PathBuf, ArchiveError> {
    match entry.link_name_bytes() {
        Some(target) if !target.is_empty() => {
            Ok(PathBuf::from(std::ffi::OsStr::from_bytes(&target)))
        }
        _ => Err(corrupt(
            archive,
            format!("link entry {name:?} has no target"),
        )),
    }
}

/// An archive path as a relative path with no `.` or `..` components;
/// empty for the archive root.
fn inside_path(raw: &[u8]) -> Result<PathBuf, String> {
    let mut rel = PathBuf::new();
    for component in Path::new(std::ffi::OsStr::from_bytes(raw)).components() {
        match component {
            Component::Normal(part) => rel.push(part),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => return Err("the path is absolute".into()),
            Component::ParentDir => return Err("the path contains `..`".into()),
        }
    }
    Ok(rel)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStringExt;
    use std::os::unix::fs::symlink;
    use std::process::Command;
    use std::sync::atomic::AtomicU64;

    const ALL: [Compression; 3] = [Compression::Zstd, Compression::Gzip, Compression::None];
    const MTIME: u64 = 1_600_000_000;

    fn set_mtime(path: &Path, secs: u64) {
        let times = FileTimes::new().set_modified(UNIX_EPOCH + Duration::from_secs(secs));
        File::open(path).unwrap().set_times(times).unwrap();
    }

    fn mtime_of(path: &Path) -> u64 {
        fs::symlink_metadata(path).unwrap().mtime() as u64
    }

    fn mode_of(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().mode() & 0o7777
    }

    /// Some hundreds of KiB that compress, but not to nothing.
    fn text(lines: u64) -> String {
        (0..lines)
            .map(|i| format!("line {i} value {}\n", i * 7919 % 1013))
            .collect()
    }

    fn noise(len: usize) -> Vec<u8> {
        let mut state = 0x9E37_79B9_7F4A_7C15_u64;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    }

    fn sample_tree(root: &Path) -> PathBuf {
        let app = root.join("app");
        fs::create_dir_all(app.join("lib/nested")).unwrap();
        fs::create_dir(app.join("empty")).unwrap();
        fs::write(app.join("lib/nested/data.txt"), text(20_000)).unwrap();
        fs::write(app.join("run.sh"), "#!/bin/sh\necho hi\n").unwrap();
        fs::set_permissions(app.join("run.sh"), Permissions::from_mode(0o755)).unwrap();
        fs::write(app.join("secret.env"), "TOKEN=x\n").unwrap();
        fs::set_permissions(app.join("secret.env"), Permissions::from_mode(0o600)).unwrap();
        symlink("lib/nested/data.txt", app.join("current")).unwrap();
        set_mtime(&app.join("run.sh"), MTIME);
        set_mtime(&app.join("empty"), MTIME);
        app
    }

    fn check_contents(restored: &Path) {
        assert_eq!(
            fs::read_to_string(restored.join("lib/nested/data.txt")).unwrap(),
            text(20_000)
        );
        assert_eq!(
            fs::read_to_string(restored.join("run.sh")).unwrap(),
            "#!/bin/sh\necho hi\n"
        );
        assert_eq!(
            fs::read_to_string(restored.join("secret.env")).unwrap(),
            "TOKEN=x\n"
        );
        assert_eq!(
            fs::read_link(restored.join("current")).unwrap(),
            Path::new("lib/nested/data.txt")
        );
        assert!(
            fs::read_dir(restored.join("empty"))
                .unwrap()
                .next()
                .is_none()
        );
    }

    fn check_tree(restored: &Path) {
        check_contents(restored);
        assert_eq!(mode_of(&restored.join("run.sh")), 0o755);
        assert_eq!(mode_of(&restored.join("secret.env")), 0o600);
        assert_eq!(mtime_of(&restored.join("run.sh")), MTIME);
        assert_eq!(mtime_of(&restored.join("empty")), MTIME);
    }

    fn archive_of(source: &Path, dir: &Path, compression: Compression) -> PathBuf {
        let dest = dir.join(format!("backup.{}", compression.extension()));
        create(source, &dest, compression, &Progress::silent()).unwrap();
        dest
    }

    #[test]
    fn compression_names_round_trip() {
        for c in ALL {
            assert_eq!(Compression::parse(c.as_str()), Some(c));
        }
        assert_eq!(Compression::parse("GZIP"), Some(Compression::Gzip));
        assert_eq!(Compression::parse("lz4"), None);
    }

    #[test]
    fn round_trip_each_compression() {
        let tmp = tempfile::tempdir().unwrap();
        let app = sample_tree(tmp.path());
        let measured = measure(&app).unwrap();
        assert_eq!(measured.files, 8);
        for c in ALL {
            let reported = AtomicU64::new(0);
            let on_bytes = |n| reported.store(n, Ordering::Relaxed);
            let never = AtomicBool::new(false);
            let progress = Progress {
                on_bytes: &on_bytes,
                cancel: &never,
            };
            let dest = tmp.path().join(format!("backup.{}", c.extension()));
            let created = create(&app, &dest, c, &progress).unwrap();
            assert_eq!(created.files, measured.files);
            assert_eq!(created.uncompressed_bytes, measured.uncompressed_bytes);
            assert_eq!(created.compressed_bytes, fs::metadata(&dest).unwrap().len());
            assert_eq!(
                reported.load(Ordering::Relaxed),
                measured.uncompressed_bytes
            );

            let read = test_read(&dest, c, &progress).unwrap();
            assert_eq!(read.uncompressed_bytes, measured.uncompressed_bytes);

            let staging = tmp.path().join(format!("staging-{}", c.as_str()));
            fs::create_dir(&staging).unwrap();
            let extracted = extract(&dest, c, &staging, &progress).unwrap();
            assert_eq!(extracted.files, measured.files);
            check_tree(&staging.join("app"));
        }
    }

    #[test]
    fn single_file_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let env = tmp.path().join("production.env");
        fs::write(&env, "DATABASE_URL=postgres://x\n").unwrap();
        fs::set_permissions(&env, Permissions::from_mode(0o640)).unwrap();
        set_mtime(&env, MTIME);
        let dest = archive_of(&env, tmp.path(), Compression::Zstd);
        let staging = tmp.path().join("staging");
        fs::create_dir(&staging).unwrap();
        let stats = extract(&dest, Compression::Zstd, &staging, &Progress::silent()).unwrap();
        assert_eq!(stats.files, 1);
        let restored = staging.join("production.env");
        assert_eq!(
            fs::read_to_string(&restored).unwrap(),
            "DATABASE_URL=postgres://x\n"
        );
        assert_eq!(mode_of(&restored), 0o640);
        assert_eq!(mtime_of(&restored), MTIME);
    }

    #[test]
    fn gnu_tar_lists_and_extracts_our_archives() {
        let tmp = tempfile::tempdir().unwrap();
        let app = sample_tree(tmp.path());
        let expected = [
            "app/",
            "app/current",
            "app/empty/",
            "app/lib/",
            "app/lib/nested/",
            "app/lib/nested/data.txt",
            "app/run.sh",
            "app/secret.env",
        ];
        for (c, flags) in [
            (Compression::Gzip, vec!["-z"]),
            (Compression::Zstd, vec!["-I", "zstd"]),
            (Compression::None, vec![]),
        ] {
            let dest = archive_of(&app, tmp.path(), c);
            let listed = Command::new("tar")
                .args(&flags)
                .arg("-tf")
                .arg(&dest)
                .output()
                .unwrap();
            assert!(
                listed.status.success(),
                "{}",
                String::from_utf8_lossy(&listed.stderr)
            );
            let mut names: Vec<_> = String::from_utf8(listed.stdout)
                .unwrap()
                .lines()
                .map(str::to_owned)
                .collect();
            names.sort();
            assert_eq!(names, expected);

            let out = tmp.path().join(format!("gnu-{}", c.as_str()));
            fs::create_dir(&out).unwrap();
            let status = Command::new("tar")
                .args(&flags)
                .arg("-xf")
                .arg(&dest)
                .arg("-C")
                .arg(&out)
                .status()
                .unwrap();
            assert!(status.success());
            check_contents(&out.join("app"));
            assert_eq!(mtime_of(&out.join("app/run.sh")), MTIME);
        }
    }

    #[test]
    fn we_extract_what_gnu_tar_creates() {
        let tmp = tempfile::tempdir().unwrap();
        let app = sample_tree(tmp.path());
        let dest = tmp.path().join("gnu.tar.gz");
        let status = Command::new("tar")
            .arg("-czf")
            .arg(&dest)
            .arg("-C")
            .arg(&app)
            .arg(".")
            .status()
            .unwrap();
        assert!(status.success());
        let staging = tmp.path().join("staging");
        fs::create_dir(&staging).unwrap();
        extract(&dest, Compression::Gzip, &staging, &Progress::silent()).unwrap();
        check_tree(&staging);
    }

    #[test]
    fn test_read_detects_corruption() {
        let tmp = tempfile::tempdir().unwrap();
        let app = sample_tree(tmp.path());
        fs::write(app.join("noise.bin"), noise(300_000)).unwrap();
        for c in ALL {
            let dest = archive_of(&app, tmp.path(), c);
            let good = fs::read(&dest).unwrap();
            let damaged = tmp.path().join("damaged");

            fs::write(&damaged, &good[..good.len() / 2]).unwrap();
            let err = test_read(&damaged, c, &Progress::silent()).unwrap_err();
            assert!(
                matches!(err, ArchiveError::Corrupt { .. }),
                "{c:?} truncated: {err}"
            );

            // Uncompressed archives have no checksum over contents.
            if c != Compression::None {
                let mut flipped = good.clone();
                let middle = flipped.len() / 2;
                flipped[middle..middle + 16]
                    .iter_mut()
                    .for_each(|b| *b ^= 0x5A);
                fs::write(&damaged, &flipped).unwrap();
                let err = test_read(&damaged, c, &Progress::silent()).unwrap_err();
                assert!(
                    matches!(err, ArchiveError::Corrupt { .. }),
                    "{c:?} flipped: {err}"
                );
            }
            fs::remove_file(&dest).unwrap();
        }
    }

    /// One raw entry, with name and link bytes written straight into the
    /// header so the tar crate's own path checks do not interfere.
    struct Raw<'r> {
        name: &'r str,
        kind: EntryType,
        link: &'r str,
    }

    fn raw(name: &str, kind: EntryType, link: &str) -> Raw<'static> {
        let leak = |s: &str| &*Box::leak(s.to_owned().into_boxed_str());
        Raw {
            name: leak(name),
            kind,
            link: leak(link),
        }
    }

    fn hostile_archive(path: &Path, entries: &[Raw]) {
        let mut builder = tar::Builder::new(File::create(path).unwrap());
        for entry in entries {
            let mut header = Header::new_gnu();
            let gnu = header.as_gnu_mut().unwrap();
            gnu.name[..entry.name.len()].copy_from_slice(entry.name.as_bytes());
            gnu.linkname[..entry.link.len()].copy_from_slice(entry.link.as_bytes());
            header.set_entry_type(entry.kind);
            header.set_mode(0o644);
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(MTIME);
            let data: &[u8] = if entry.kind == EntryType::Regular {
                b"evil\n"
            } else {
                b""
            };
            header.set_size(data.len() as u64);
            header.set_cksum();
            builder.append(&header, data).unwrap();
        }
        builder.into_inner().unwrap().sync_all().unwrap();
    }

    fn listing(dir: &Path) -> Vec<String> {
        let mut names: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn assert_refused(entries: &[Raw], refused: &str) {
        let tmp = tempfile::tempdir().unwrap();
        let archive = tmp.path().join("evil.tar");
        hostile_archive(&archive, entries);
        let parent = tmp.path().join("restore");
        let staging = parent.join("staging");
        fs::create_dir_all(&staging).unwrap();

        let err = extract(&archive, Compression::None, &staging, &Progress::silent()).unwrap_err();
        match &err {
            ArchiveError::Unsafe { entry, .. } => assert_eq!(entry, refused, "{err}"),
            other => panic!("expected Unsafe for {refused}, got {other}"),
        }
        assert_eq!(listing(&parent), ["staging"]);
        assert_eq!(listing(tmp.path()), ["evil.tar", "restore"]);
    }

    #[test]
    fn refuses_hostile_paths() {
        assert_refused(&[raw("/abs/file", EntryType::Regular, "")], "/abs/file");
        assert_refused(&[raw("../escape", EntryType::Regular, "")], "../escape");
        assert_refused(
            &[
                raw("ok/", EntryType::Directory, ""),
                raw("a/../../escape", EntryType::Regular, ""),
            ],
            "a/../../escape",
        );
    }

    #[test]
    fn refuses_hostile_links() {
        // A symlink out is restored as it is, but nothing goes through it.
        assert_refused(
            &[
                raw("etc", EntryType::Symlink, "/etc"),
                raw("etc/evil", EntryType::Regular, ""),
            ],
            "etc/evil",
        );
        assert_refused(
            &[
                raw("link", EntryType::Symlink, ".."),
                raw("link/evil", EntryType::Regular, ""),
            ],
            "link/evil",
        );
        assert_refused(
            &[
                raw("sub/", EntryType::Directory, ""),
                raw("sub/link", EntryType::Symlink, ".."),
                raw("sub/link/evil", EntryType::Regular, ""),
            ],
            "sub/link/evil",
        );
        assert_refused(&[raw("hl", EntryType::Link, "/etc/passwd")], "hl");
        assert_refused(&[raw("hl", EntryType::Link, "../outside")], "hl");
    }

    #[test]
    fn restores_outward_symlinks_verbatim_and_never_follows_them() {
        let tmp = tempfile::tempdir().unwrap();
        let archive = tmp.path().join("venv.tar");
        hostile_archive(
            &archive,
            &[
                raw("venv/", EntryType::Directory, ""),
                raw("venv/bin/", EntryType::Directory, ""),
                raw("venv/bin/python3", EntryType::Symlink, "/usr/bin/python3"),
                raw("venv/lib64", EntryType::Symlink, "../outside"),
            ],
        );
        let staging = tmp.path().join("staging");
        fs::create_dir(&staging).unwrap();
        extract(&archive, Compression::None, &staging, &Progress::silent()).unwrap();
        assert_eq!(
            fs::read_link(staging.join("venv/bin/python3")).unwrap(),
            Path::new("/usr/bin/python3")
        );
        assert_eq!(
            fs::read_link(staging.join("venv/lib64")).unwrap(),
            Path::new("../outside")
        );
        // A file of the same name later replaces the link; it is not written through it.
        assert_refused(
            &[
                raw("d/", EntryType::Directory, ""),
                raw("d/l1", EntryType::Symlink, ".."),
                raw("d/l1/x", EntryType::Regular, ""),
            ],
            "d/l1/x",
        );
        // A hard link to a symlink is a symlink, and as inert.
        assert_refused(
            &[
                raw("a/b/", EntryType::Directory, ""),
                raw("a/b/l", EntryType::Symlink, "/etc"),
                raw("l2", EntryType::Link, "a/b/l"),
                raw("l2/passwd", EntryType::Regular, ""),
            ],
            "l2/passwd",
        );
    }

    /// Entries out of directory order, repeated names and replaced kinds:
    /// the cached parent descriptors and the create-first slots give what
    /// GNU tar gives (the last entry of a name wins).
    #[test]
    fn out_of_order_and_repeated_entries_extract_like_tar() {
        let tmp = tempfile::tempdir().unwrap();
        let archive = tmp.path().join("mixed.tar");
        let mut builder = tar::Builder::new(File::create(&archive).unwrap());
        let mut add = |name: &str, kind: EntryType, body: &[u8], link: &str| {
            let mut header = Header::new_gnu();
            header.set_entry_type(kind);
            header.set_mode(if kind == EntryType::Directory {
                0o755
            } else {
                0o644
            });
            header.set_mtime(MTIME);
            header.set_uid(0);
            header.set_gid(0);
            header.set_size(body.len() as u64);
            if !link.is_empty() {
                header.set_link_name(link).unwrap();
            }
            builder.append_data(&mut header, name, body).unwrap();
        };
        add("a/b/f1", EntryType::Regular, b"first\n", "");
        add("c/f2", EntryType::Regular, b"c\n", "");
        add("a/b/f3", EntryType::Regular, b"three\n", "");
        add("a/b/f1", EntryType::Regular, b"second\n", "");
        add("a/b/l", EntryType::Symlink, b"", "f3");
        add("a/b/l", EntryType::Regular, b"no longer a link\n", "");
        add("d", EntryType::Regular, b"a file first\n", "");
        add("d/", EntryType::Directory, b"", "");
        add("d/e", EntryType::Regular, b"e\n", "");
        add("g/", EntryType::Directory, b"", "");
        add("g", EntryType::Symlink, b"", "a");
        add("a/h", EntryType::Link, b"", "a/b/f3");
        add("a/b/f3", EntryType::Symlink, b"", "f1");
        builder.into_inner().unwrap().sync_all().unwrap();

        for (name, with_tar) in [("ours", false), ("tar", true)] {
            let out = tmp.path().join(name);
            fs::create_dir(&out).unwrap();
            if with_tar {
                let status = Command::new("tar")
                    .arg("-xf")
                    .arg(&archive)
                    .arg("-C")
                    .arg(&out)
                    .status()
                    .unwrap();
                assert!(status.success());
            } else {
                extract(&archive, Compression::None, &out, &Progress::silent()).unwrap();
            }
        }
        let (ours, theirs) = (tmp.path().join("ours"), tmp.path().join("tar"));
        fn deep_listing(root: &Path, dir: &Path, out: &mut Vec<String>) {
            for name in listing(dir) {
                let path = dir.join(&name);
                let meta = fs::symlink_metadata(&path).unwrap();
                let rel = path.strip_prefix(root).unwrap().display().to_string();
                out.push(format!("{rel} {:?}", meta.file_type()));
                if meta.is_dir() {
                    deep_listing(root, &path, out);
                }
            }
        }
        let (mut a, mut b) = (Vec::new(), Vec::new());
        deep_listing(&ours, &ours, &mut a);
        deep_listing(&theirs, &theirs, &mut b);
        assert_eq!(a, b);
        for file in ["a/b/f1", "c/f2", "a/b/l", "d/e", "a/h"] {
            assert_eq!(
                fs::read(ours.join(file)).unwrap(),
                fs::read(theirs.join(file)).unwrap(),
                "{file}"
            );
        }
        assert_eq!(fs::read(ours.join("a/b/f1")).unwrap(), b"second\n");
        assert_eq!(fs::read(ours.join("a/h")).unwrap(), b"three\n");
        assert_eq!(
            fs::read_link(ours.join("g")).unwrap(),
            PathBuf::from("a"),
            "an empty directory replaced by a symlink"
        );
        assert_eq!(
            fs::read_link(ours.join("a/b/f3")).unwrap(),
            PathBuf::from("f1")
        );
    }

    #[test]
    fn refuses_devices_and_fifos() {
        assert_refused(&[raw("fifo", EntryType::Fifo, "")], "fifo");
        assert_refused(&[raw("null", EntryType::Char, "")], "null");
        assert_refused(&[raw("sda", EntryType::Block, "")], "sda");
    }

    #[test]
    fn extracts_safe_links() {
        let tmp = tempfile::tempdir().unwrap();
        let archive = tmp.path().join("ok.tar");
        hostile_archive(
            &archive,
            &[
                raw("app/releases/v2/", EntryType::Directory, ""),
                raw("app/releases/v2/bin", EntryType::Regular, ""),
                raw("app/current", EntryType::Symlink, "releases/v2"),
                raw("app/bin", EntryType::Symlink, "current/bin"),
                raw("app/copy", EntryType::Link, "app/releases/v2/bin"),
            ],
        );
        let staging = tmp.path().join("staging");
        fs::create_dir(&staging).unwrap();
        extract(&archive, Compression::None, &staging, &Progress::silent()).unwrap();
        assert_eq!(
            fs::read_to_string(staging.join("app/bin")).unwrap(),
            "evil\n"
        );
        assert_eq!(
            fs::read_to_string(staging.join("app/copy")).unwrap(),
            "evil\n"
        );
    }

    #[test]
    fn cancel_stops_every_operation() {
        let tmp = tempfile::tempdir().unwrap();
        let app = sample_tree(tmp.path());
        let dest = archive_of(&app, tmp.path(), Compression::Gzip);
        let canceled = AtomicBool::new(true);
        let progress = Progress {
            on_bytes: &|_| {},
            cancel: &canceled,
        };

        for c in ALL {
            let partial = tmp.path().join(format!("partial.{}", c.extension()));
            let err = create(&app, &partial, c, &progress).unwrap_err();
            assert!(matches!(err, ArchiveError::Canceled), "{err}");
            assert!(!partial.exists(), "create removes its partial output");
        }
        let err = test_read(&dest, Compression::Gzip, &progress).unwrap_err();
        assert!(matches!(err, ArchiveError::Canceled), "{err}");
        let staging = tmp.path().join("staging");
        fs::create_dir(&staging).unwrap();
        let err = extract(&dest, Compression::Gzip, &staging, &progress).unwrap_err();
        assert!(matches!(err, ArchiveError::Canceled), "{err}");
    }

    #[test]
    fn create_refuses_existing_dest() {
        let tmp = tempfile::tempdir().unwrap();
        let app = sample_tree(tmp.path());
        let dest = tmp.path().join("exists.tar");
        fs::write(&dest, "keep me").unwrap();
        let err = create(&app, &dest, Compression::None, &Progress::silent()).unwrap_err();
        assert!(matches!(err, ArchiveError::Io { .. }), "{err}");
    }

    /// Unmounts the tiny tmpfs even when the test fails.
    struct TmpfsMount(PathBuf);

    impl Drop for TmpfsMount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }

    #[test]
    fn full_disk_is_no_space_and_leaves_no_partial_file() {
        let tmp = tempfile::tempdir().unwrap();
        let mnt = tmp.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
            .arg(&mnt)
            .output();
        if !mounted.is_ok_and(|out| out.status.success()) {
            eprintln!("skipping: cannot mount a tmpfs here (needs root)");
            return;
        }
        let _mount = TmpfsMount(mnt.clone());
        let source = tmp.path().join("big");
        fs::create_dir(&source).unwrap();
        fs::write(source.join("noise.bin"), noise(3 << 20)).unwrap();

        for c in ALL {
            let dest = mnt.join(format!("big.{}", c.extension()));
            let err = create(&source, &dest, c, &Progress::silent()).unwrap_err();
            assert!(
                matches!(&err, ArchiveError::NoSpace { path } if *path == dest),
                "{c:?}: {err}"
            );
            assert!(
                err.to_string()
                    .starts_with("no space left on the backup disk writing")
            );
            assert!(!dest.exists());
        }
    }

    // ----------------------------------------------------- hostile archives

    /// A tar number field in base-256 (any size fits).
    fn num(field: &mut [u8], value: u64) {
        field.fill(0);
        field[0] = 0x80;
        let bytes = value.to_be_bytes();
        let n = field.len();
        field[n - 8..].copy_from_slice(&bytes);
    }

    /// One raw entry: a GNU header with `name` bytes as given (no checks),
    /// `kind`, a declared `size`, then `data` (possibly fewer bytes than
    /// declared), padded.
    fn raw_entry(out: &mut Vec<u8>, name: &[u8], kind: u8, link: &[u8], size: u64, data: &[u8]) {
        if name.len() > 99 {
            // GNU long name entry first.
            let mut long = name.to_vec();
            long.push(0);
            raw_entry(out, b"././@LongLink", b'L', b"", long.len() as u64, &long);
        }
        let mut header = Header::new_gnu();
        let raw = header.as_old_mut();
        let n = name.len().min(99);
        raw.name[..n].copy_from_slice(&name[..n]);
        let l = link.len().min(99);
        raw.linkname[..l].copy_from_slice(&link[..l]);
        header.set_mode(0o4755);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(MTIME);
        header.set_entry_type(EntryType::new(kind));
        num(&mut header.as_old_mut().size, size);
        header.set_cksum();
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        out.extend(std::iter::repeat_n(0, pad));
    }

    /// A GNU sparse entry of apparent size `apparent` holding 512 bytes of
    /// `X` at its end.
    fn sparse_entry(out: &mut Vec<u8>, name: &[u8], apparent: u64) {
        let mut header = Header::new_gnu();
        header.as_old_mut().name[..name.len()].copy_from_slice(name);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(MTIME);
        header.set_entry_type(EntryType::GNUSparse);
        num(&mut header.as_old_mut().size, 512);
        let gnu = header.as_gnu_mut().unwrap();
        num(&mut gnu.realsize, apparent);
        num(&mut gnu.sparse[0].offset, apparent - 512);
        num(&mut gnu.sparse[0].numbytes, 512);
        header.set_cksum();
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(&[b'X'; 512]);
    }

    fn finish_tar(out: &mut Vec<u8>) {
        out.extend_from_slice(&[0; 1024]);
    }

    #[test]
    fn a_recorded_size_is_checked_up_front_and_the_disk_bounds_the_rest() {
        let tmp = tempfile::tempdir().unwrap();
        let mut bomb = Vec::new();
        raw_entry(&mut bomb, b"first", b'0', b"", 3, b"abc");
        sparse_entry(&mut bomb, b"bomb", 1 << 50);
        finish_tar(&mut bomb);
        let archive = tmp.path().join("bomb.tar");
        fs::write(&archive, &bomb).unwrap();
        let extract_with = |known_size: u64, name: &str| {
            let staging = tmp.path().join(name);
            fs::create_dir(&staging).unwrap();
            let dir = Dir::open(&staging).unwrap();
            let options = ExtractOptions {
                owner: None,
                known_size: Some(known_size),
            };
            let result = extract_into(
                &archive,
                Compression::None,
                &dir,
                &staging,
                options,
                &Progress::silent(),
            );
            (staging, result)
        };
        // A recorded size that does not fit is refused before anything.
        let (staging, result) = extract_with(1 << 60, "a");
        assert!(matches!(result, Err(ArchiveError::TooLarge { needed, .. }) if needed == 1 << 60));
        assert_eq!(fs::read_dir(&staging).unwrap().count(), 0);
        // A recorded size that lies is stopped by the free space.
        let (_, result) = extract_with(3, "b");
        assert!(
            matches!(result, Err(ArchiveError::TooLarge { .. })),
            "{result:?}"
        );
    }

    #[test]
    fn sparse_entries_stay_sparse_and_bombs_are_refused_before_writing() {
        let tmp = tempfile::tempdir().unwrap();
        let mut tar = Vec::new();
        sparse_entry(&mut tar, b"holes", 64 << 20);
        finish_tar(&mut tar);
        let archive = tmp.path().join("sparse.tar");
        fs::write(&archive, &tar).unwrap();
        let staging = tmp.path().join("staging");
        fs::create_dir(&staging).unwrap();
        extract(&archive, Compression::None, &staging, &Progress::silent()).unwrap();
        let meta = fs::metadata(staging.join("holes")).unwrap();
        assert_eq!(meta.len(), 64 << 20);
        assert!(
            meta.blocks() * 512 < 1 << 20,
            "holes were written: {} blocks",
            meta.blocks()
        );
        let body = fs::read(staging.join("holes")).unwrap();
        assert!(body[..(64 << 20) - 512].iter().all(|&b| b == 0));
        assert!(body[(64 << 20) - 512..].iter().all(|&b| b == b'X'));

        // 10 KiB on disk, a petabyte apparent: refused, nothing written.
        let mut bomb = Vec::new();
        raw_entry(&mut bomb, b"first", b'0', b"", 3, b"abc");
        sparse_entry(&mut bomb, b"bomb", 1 << 50);
        finish_tar(&mut bomb);
        let archive = tmp.path().join("bomb.tar");
        fs::write(&archive, &bomb).unwrap();
        let staging = tmp.path().join("staging2");
        fs::create_dir(&staging).unwrap();
        let err = extract(&archive, Compression::None, &staging, &Progress::silent()).unwrap_err();
        let message = err.to_string();
        assert!(
            matches!(err, ArchiveError::TooLarge { needed, .. } if needed == (1 << 50) + 3),
            "{message}"
        );
        assert!(
            message.contains(&((1u64 << 50) + 3).to_string()) && message.contains("free"),
            "{message}"
        );
        assert_eq!(
            fs::read_dir(&staging).unwrap().count(),
            0,
            "nothing was written"
        );
    }

    #[test]
    fn imposed_owner_strips_setuid_and_owns_implied_directories() {
        if !crate::files::is_root() {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let mut tar = Vec::new();
        raw_entry(&mut tar, b"rel-1/bin/helper", b'0', b"", 2, b"hi");
        raw_entry(&mut tar, b"rel-1/lib/", b'5', b"", 0, b"");
        finish_tar(&mut tar);
        let archive = tmp.path().join("rel.tar");
        fs::write(&archive, &tar).unwrap();
        let staging = tmp.path().join("staging");
        fs::create_dir(&staging).unwrap();
        let dir = Dir::open(&staging).unwrap();
        let options = ExtractOptions {
            owner: Some((65534, 65534)),
            known_size: None,
        };
        extract_into(
            &archive,
            Compression::None,
            &dir,
            &staging,
            options,
            &Progress::silent(),
        )
        .unwrap();
        let helper = fs::metadata(staging.join("rel-1/bin/helper")).unwrap();
        assert_eq!((helper.uid(), helper.gid()), (65534, 65534));
        assert_eq!(helper.mode() & 0o7777, 0o755, "setuid dropped");
        for d in ["rel-1", "rel-1/bin", "rel-1/lib"] {
            let m = fs::metadata(staging.join(d)).unwrap();
            assert_eq!(m.uid(), 65534, "{d}");
            assert_eq!(m.mode() & 0o6000, 0, "{d}");
        }
        // Without an imposed owner (a backup, as root), the archive's bits stay.
        let plain = tmp.path().join("plain");
        fs::create_dir(&plain).unwrap();
        extract(&archive, Compression::None, &plain, &Progress::silent()).unwrap();
        let helper = fs::metadata(plain.join("rel-1/bin/helper")).unwrap();
        assert_eq!(helper.mode() & 0o7777, 0o4755);
    }

    /// Hostile entry names: `..`, absolute paths into the sentinel, long
    /// names, names through links, plain names that later entries reuse.
    fn hostile_names(sentinel: &Path) -> Vec<Vec<u8>> {
        let abs = sentinel.join("victim").into_os_string().into_vec();
        let abs_dir = sentinel.join("vdir/new").into_os_string().into_vec();
        let mut names: Vec<Vec<u8>> = [
            "a",
            "a/b",
            "a/b/c",
            "l",
            "l/x",
            "l/../x",
            "../x",
            "../../vdir/y",
            "./a/../..",
            "m",
            "m/n",
            "h",
            "h/z",
            "a/l2",
            "a/l2/w",
            "",
            ".",
            "./",
            "a//b",
            "dev",
        ]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect();
        names.push(abs);
        names.push(abs_dir);
        names.push(vec![b'd'; 300]);
        names.push([b"a/".as_slice(), &[b'e'; 150], b"/../../.."].concat());
        names
    }

    fn hostile_targets(sentinel: &Path) -> Vec<Vec<u8>> {
        let mut targets: Vec<Vec<u8>> = [
            "..", "../..", "a", "l", "a/b", "/", "../vdir", "l/x", "m", ".",
        ]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect();
        targets.push(sentinel.as_os_str().as_bytes().to_vec());
        targets.push(sentinel.join("victim").into_os_string().into_vec());
        targets.push(sentinel.join("vdir").into_os_string().into_vec());
        targets
    }

    /// What must not change: every object in the sentinel but the target.
    fn sentinel_state(sentinel: &Path) -> Vec<String> {
        let mut state: Vec<String> = fs::read_dir(sentinel)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        state.sort();
        for name in ["victim", "vdir"] {
            state.push(crate::files::tree_fingerprint(&sentinel.join(name)).unwrap());
            let m = fs::symlink_metadata(sentinel.join(name)).unwrap();
            state.push(format!("{} {} {:o}", m.uid(), m.gid(), m.mode()));
        }
        state.push(fs::read_to_string(sentinel.join("victim")).unwrap());
        state
    }

    #[test]
    fn fuzz_hostile_archives_never_escape() {
        use proptest::prelude::*;
        let tmp = tempfile::tempdir().unwrap();
        let sentinel = tmp.path().join("sentinel");
        fs::create_dir_all(sentinel.join("vdir")).unwrap();
        fs::write(sentinel.join("victim"), "untouched").unwrap();
        let names = hostile_names(&sentinel);
        let targets = hostile_targets(&sentinel);
        let before = sentinel_state(&sentinel);
        // kind: regular, hard link, symlink, char dev, block dev, dir, FIFO,
        // sparse, unknown; declared size: small, data-sized, huge; data
        // possibly cut short; the end marker possibly missing.
        let entry = (
            0..names.len(),
            prop::sample::select(vec![
                b'0', b'1', b'2', b'3', b'4', b'5', b'6', b'S', b'x', b'7',
            ]),
            0..targets.len(),
            prop::sample::select(vec![0u64, 3, 600, 1 << 40]),
            0usize..700,
        );
        let strategy = (prop::collection::vec(entry, 1..12), any::<bool>());
        let counter = AtomicU64::new(0);
        crate::fuzzing::run(256, strategy, |(entries, finished)| {
            let case = counter.fetch_add(1, Ordering::Relaxed);
            let target = sentinel.join(format!("target-{case}"));
            fs::create_dir(&target).unwrap();
            let mut tar = Vec::new();
            for (name, kind, link, size, data_len) in entries {
                let data = vec![b'q'; data_len];
                if kind == b'S' {
                    let name = &names[name];
                    if !name.is_empty() && name.len() < 99 {
                        sparse_entry(&mut tar, name, 1 << 40);
                    }
                    continue;
                }
                raw_entry(&mut tar, &names[name], kind, &targets[link], size, &data);
            }
            if finished {
                finish_tar(&mut tar);
            }
            let archive = tmp.path().join(format!("case-{case}.tar"));
            fs::write(&archive, &tar).unwrap();
            // Any outcome is fine but an escape, a panic or a hang.
            let _ = extract(&archive, Compression::None, &target, &Progress::silent());
            let _ = fs::remove_dir_all(&target);
            let _ = fs::remove_file(&archive);
            prop_assert_eq!(sentinel_state(&sentinel), before.clone());
            Ok(())
        });
    }
}
