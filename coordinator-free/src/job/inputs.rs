//! A job's unit inputs, produced when a unit needs them rather than held for the whole job.
//!
//! A sweep computes a point from its index; a JSON-lines file is scanned once for where its
//! lines start and read back a line at a time; input files are hashed once (their digests make
//! the job id and name the blobs peers fetch) and read again when their unit is leased, checked
//! against their digest unless their metadata shows them unchanged since they were hashed. What stays in memory is a few bytes per line or file, and
//! nothing per point of a sweep.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::digest::Digest;
use crate::job::manifest::{
    InputSpec, JobManifest, MAX_INPUT_BYTES, MAX_UNITS, ManifestError, Sweep, UnitInput,
};

/// Why a unit's input could not be produced while the job ran.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not what it was when the job started: its results would not be this
    /// job's.
    #[error("{path} changed while the job ran; submit it again to run the new contents")]
    Changed { path: PathBuf },
    /// No unit has this index.
    #[error("the job has no unit {0}")]
    NoSuchUnit(u64),
}

/// Where each unit's input comes from.
#[derive(Debug)]
pub struct UnitSource {
    kind: Kind,
    count: u64,
    digest: Digest,
}

#[derive(Debug)]
enum Kind {
    Sweep(Sweep),
    Files(Vec<InputFile>),
    Lines {
        path: PathBuf,
        file: File,
        /// The file's length when scanned, checked again at every read.
        len: u64,
        lines: Vec<Line>,
    },
    /// Inputs given as bytes (tests and embedded jobs).
    Bytes(Vec<Vec<u8>>),
}

#[derive(Debug)]
struct InputFile {
    path: PathBuf,
    len: u64,
    digest: Digest,
    /// Its metadata when hashed, if it had settled: while it matches, serving the file needs
    /// no second hash (peers check every blob's digest on arrival all the same).
    stamp: Option<Stamp>,
}

/// A non-empty line of a JSON-lines file: where it starts, its length and its line number.
#[derive(Debug, Clone, Copy)]
struct Line {
    at: u64,
    len: u32,
    number: u32,
}

impl UnitSource {
    /// The inputs of `manifest` (loaded from `manifest_path`): a JSON-lines file is scanned
    /// and every line checked to be JSON, input files are hashed. Errors name the field and
    /// the file or line.
    pub fn open(manifest: &JobManifest, manifest_path: &Path) -> Result<Self, ManifestError> {
        let invalid = |field: &str, problem: String| ManifestError::Invalid {
            path: manifest_path.to_owned(),
            field: field.to_owned(),
            problem,
        };
        match &manifest.inputs {
            InputSpec::Sweep(sweep) => Ok(Self::sweep(sweep.clone())),
            InputSpec::Files(files) => {
                Self::files("inputs.files", files.clone(), SETTLED, &invalid)
            }
            InputSpec::Dir(dir) => {
                let files = crate::job::manifest::dir_files(dir)
                    .map_err(|e| invalid("inputs.dir", format!("{}: {e}", dir.display())))?;
                Self::files("inputs.dir", files, SETTLED, &invalid)
            }
            InputSpec::JsonLines(path) => Self::lines(path, &invalid),
        }
    }

    /// The points of a sweep.
    pub fn sweep(sweep: Sweep) -> Self {
        let mut h = blake3::Hasher::new();
        h.update(b"sweep\0");
        for (name, values) in sweep.params() {
            // A range by its definition, a list by its values: never every value of a range.
            let text = serde_json::to_string(&(name, values)).unwrap_or_default();
            h.update(&(text.len() as u64).to_le_bytes());
            h.update(text.as_bytes());
        }
        Self {
            count: sweep.len(),
            digest: Digest(*h.finalize().as_bytes()),
            kind: Kind::Sweep(sweep),
        }
    }

    /// Inputs given as bytes, unit `i` the `i`th.
    pub fn bytes(inputs: Vec<Vec<u8>>) -> Self {
        let mut h = blake3::Hasher::new();
        h.update(b"bytes\0");
        for input in &inputs {
            h.update(&Digest::of(input).0);
        }
        Self {
            count: inputs.len() as u64,
            digest: Digest(*h.finalize().as_bytes()),
            kind: Kind::Bytes(inputs),
        }
    }

    fn files(
        field: &str,
        paths: Vec<PathBuf>,
        settled: Duration,
        invalid: &dyn Fn(&str, String) -> ManifestError,
    ) -> Result<Self, ManifestError> {
        if paths.len() as u64 > MAX_UNITS {
            return Err(invalid(field, format!("more than {MAX_UNITS} files")));
        }
        use rayon::prelude::*;
        let mut h = blake3::Hasher::new();
        h.update(b"files\0");
        // Files are hashed on every core at once (their digests kept in the list's order):
        // while one core waits for a file's pages to be mapped in, the other hashes. One buffer per thread
        // for small files: a fresh allocation per file costs a page fault and a zeroed page
        // for every 4 KiB read, as much time as the hashing.
        let hashed: Vec<std::io::Result<(u64, Digest, Option<Stamp>)>> = paths
            .par_iter()
            .map_init(Vec::new, |buf, path| hash_stamped(path, settled, buf))
            .collect();
        let mut files = Vec::with_capacity(paths.len());
        for (path, hashed) in paths.into_iter().zip(hashed) {
            let (len, digest, stamp) = hashed.map_err(|e| invalid(field, e.to_string()))?;
            h.update(&digest.0);
            files.push(InputFile {
                len,
                path,
                digest,
                stamp,
            });
        }
        Ok(Self {
            count: files.len() as u64,
            digest: Digest(*h.finalize().as_bytes()),
            kind: Kind::Files(files),
        })
    }

    fn lines(
        path: &Path,
        invalid: &dyn Fn(&str, String) -> ManifestError,
    ) -> Result<Self, ManifestError> {
        let field = "inputs.jsonl";
        let shown = path.display();
        let file = File::open(path).map_err(|e| invalid(field, format!("{shown}: {e}")))?;
        let mut reader = BufReader::with_capacity(1 << 16, &file);
        let mut h = blake3::Hasher::new();
        h.update(b"jsonl\0");
        let mut lines = Vec::new();
        let mut line = Vec::new();
        let mut at = 0u64;
        for number in 1u32.. {
            line.clear();
            // A line is read only up to one past the cap, so a file without newlines cannot
            // make us hold it whole.
            let read = (&mut reader)
                .take(MAX_INPUT_BYTES + 1)
                .read_until(b'\n', &mut line)
                .map_err(|e| invalid(field, format!("{shown}: {e}")))?;
            if read == 0 {
                break;
            }
            if read as u64 > MAX_INPUT_BYTES {
                return Err(invalid(
                    field,
                    format!(
                        "{shown} line {number} is over the input cap of {MAX_INPUT_BYTES} bytes"
                    ),
                ));
            }
            h.update(&line);
            let text = std::str::from_utf8(&line)
                .map_err(|_| invalid(field, format!("{shown} line {number} is not UTF-8")))?;
            if !text.trim().is_empty() {
                serde_json::from_str::<serde::de::IgnoredAny>(text.trim())
                    .map_err(|e| invalid(field, format!("{shown} line {number}: {e}")))?;
                lines.push(Line {
                    at,
                    len: read as u32,
                    number,
                });
                if lines.len() as u64 > MAX_UNITS {
                    return Err(invalid(field, format!("more than {MAX_UNITS} lines")));
                }
            }
            at += read as u64;
        }
        if lines.is_empty() {
            return Err(invalid(field, format!("{shown} has no inputs")));
        }
        lines.shrink_to_fit();
        Ok(Self {
            count: lines.len() as u64,
            digest: Digest(*h.finalize().as_bytes()),
            kind: Kind::Lines {
                path: path.to_owned(),
                file,
                len: at,
                lines,
            },
        })
    }

    /// How many units.
    pub fn len(&self) -> u64 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// What the inputs are, in one digest: a sweep's parameters, the bytes of a JSON-lines
    /// file, the digests of the input files. Part of the job id.
    pub fn digest(&self) -> Digest {
        self.digest
    }

    /// The size and digest of unit `index`'s input when known without producing it (input
    /// files, hashed when the job started).
    pub fn known(&self, index: u64) -> Option<(u64, Digest)> {
        match &self.kind {
            Kind::Files(files) => files
                .get(usize::try_from(index).ok()?)
                .map(|f| (f.len, f.digest)),
            _ => None,
        }
    }

    /// Unit `index`'s input bytes.
    pub fn input(&self, index: u64) -> Result<Vec<u8>, InputError> {
        let missing = || InputError::NoSuchUnit(index);
        let at = usize::try_from(index).map_err(|_| missing())?;
        match &self.kind {
            Kind::Sweep(sweep) => sweep.input(index).ok_or_else(missing),
            Kind::Bytes(inputs) => inputs.get(at).cloned().ok_or_else(missing),
            Kind::Files(files) => {
                let f = files.get(at).ok_or_else(missing)?;
                let read_err = |source| InputError::Read {
                    path: f.path.clone(),
                    source,
                };
                let mut file = File::open(&f.path).map_err(read_err)?;
                let meta = file.metadata().map_err(read_err)?;
                let unchanged = f.stamp.is_some_and(|s| s == Stamp::of(&meta));
                let bytes = read_open(&mut file, &meta).map_err(read_err)?;
                if bytes.len() as u64 != f.len || !unchanged && Digest::of(&bytes) != f.digest {
                    return Err(InputError::Changed {
                        path: f.path.clone(),
                    });
                }
                Ok(bytes)
            }
            Kind::Lines { .. } => {
                let value = self.line_value(at)?;
                Ok(value.to_string().into_bytes())
            }
        }
    }

    /// Where unit `index`'s input came from, for its results line: the file, the line number
    /// and its value, or the sweep point.
    pub fn origin(&self, index: u64) -> Result<serde_json::Value, InputError> {
        let missing = || InputError::NoSuchUnit(index);
        let at = usize::try_from(index).map_err(|_| missing())?;
        Ok(match &self.kind {
            Kind::Sweep(sweep) => {
                let point = sweep.point(index).ok_or_else(missing)?;
                serde_json::json!({ "params": serde_json::Value::Object(point) })
            }
            Kind::Bytes(inputs) => {
                let input = inputs.get(at).ok_or_else(missing)?;
                serde_json::json!({ "bytes": input.len() })
            }
            Kind::Files(files) => {
                let f = files.get(at).ok_or_else(missing)?;
                serde_json::json!({ "file": f.path.display().to_string() })
            }
            Kind::Lines { lines, .. } => {
                let number = lines.get(at).ok_or_else(missing)?.number;
                serde_json::json!({ "line": number, "input": self.line_value(at)? })
            }
        })
    }

    /// Unit `index` whole: its input and where it came from.
    pub fn unit(&self, index: u64) -> Result<UnitInput, InputError> {
        Ok(UnitInput {
            index,
            bytes: self.input(index)?,
            origin: self.origin(index)?,
        })
    }

    fn line_value(&self, at: usize) -> Result<serde_json::Value, InputError> {
        let Kind::Lines {
            path,
            file,
            len,
            lines,
        } = &self.kind
        else {
            return Err(InputError::NoSuchUnit(at as u64));
        };
        let line = lines.get(at).ok_or(InputError::NoSuchUnit(at as u64))?;
        let read_err = |source| InputError::Read {
            path: path.clone(),
            source,
        };
        let changed = || InputError::Changed { path: path.clone() };
        if file.metadata().map_err(read_err)?.len() != *len {
            return Err(changed());
        }
        let mut bytes = vec![0; line.len as usize];
        file.read_exact_at(&mut bytes, line.at).map_err(read_err)?;
        let text = std::str::from_utf8(&bytes).map_err(|_| changed())?;
        serde_json::from_str(text.trim()).map_err(|_| changed())
    }
}

/// A file's bytes, refused past the input cap before they are read, and its [`Stamp`] when
/// the file did not change while it was read and had not changed for `settled` before.
/// Bytes read and hashed at a time when a small input file is hashed.
const HASH_CHUNK: usize = 1 << 20;
/// Input files at least this long are hashed from a read-only mapping: reading them into a
/// buffer first costs a copy of every byte, on one core, before the hashing can use both.
const MAP_AT_LEAST: u64 = 1 << 20;

/// A file mapped read-only for as long as this value lives.
struct Mapped {
    at: *mut libc::c_void,
    len: usize,
}

impl Mapped {
    /// Maps the first `len` bytes of `file` (its length when it was opened), with every page
    /// read in at once rather than on first touch.
    fn of(file: &File, len: u64) -> std::io::Result<Self> {
        use std::os::fd::AsRawFd;
        let len = usize::try_from(len).map_err(std::io::Error::other)?;
        // SAFETY: a fresh private read-only mapping of a descriptor we hold open; no memory
        // of ours is touched, and a failure is reported as MAP_FAILED.
        let at = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_POPULATE,
                file.as_raw_fd(),
                0,
            )
        };
        if at == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self { at, len })
    }

    /// The mapped bytes. Shortening the file while they are read would fault the process (as
    /// any tool that maps files): the window is the few milliseconds one file takes to hash,
    /// at the start of a job, on the submitter's own files. A file that changes in any other
    /// way is caught by its stamp (read before and after) and, unstamped, by its digest.
    fn bytes(&self) -> &[u8] {
        // SAFETY: `at` is a live mapping of `len` readable bytes until `drop`.
        unsafe { std::slice::from_raw_parts(self.at.cast::<u8>(), self.len) }
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `of` made; no slice of it outlives `self`.
        unsafe {
            libc::munmap(self.at, self.len);
        }
    }
}

/// The length and digest of the file at `path`, read through `buf`, with its stamp if the
/// file was settled and did not change while it was read.
fn hash_stamped(
    path: &Path,
    settled: Duration,
    buf: &mut Vec<u8>,
) -> std::io::Result<(u64, Digest, Option<Stamp>)> {
    let started = SystemTime::now();
    let mut file = File::open(path).map_err(|e| named(path, e))?;
    let before = file.metadata().map_err(|e| named(path, e))?;
    admit(&before).map_err(|e| named(path, e))?;
    let mut hasher = blake3::Hasher::new();
    let len = if before.len() >= MAP_AT_LEAST {
        let mapped = Mapped::of(&file, before.len()).map_err(|e| named(path, e))?;
        // Every core hashes: nothing else runs yet, and large inputs are gigabytes.
        hasher.update_rayon(mapped.bytes());
        before.len()
    } else {
        buf.resize(HASH_CHUNK.min(before.len() as usize).max(1), 0);
        let mut len = 0u64;
        loop {
            let read = file.read(buf).map_err(|e| named(path, e))?;
            if read == 0 {
                break;
            }
            len += read as u64;
            if len > MAX_INPUT_BYTES {
                return Err(named(
                    path,
                    std::io::Error::other("grew past the input cap"),
                ));
            }
            hasher.update(&buf[..read]);
        }
        len
    };
    let after = file.metadata().map_err(|e| named(path, e))?;
    let stamp = Stamp::of(&before);
    let quiet = started
        .checked_sub(settled)
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .is_some_and(|t| stamp.ctime < (t.as_secs() as i64, i64::from(t.subsec_nanos())));
    Ok((
        len,
        Digest(*hasher.finalize().as_bytes()),
        (quiet && Stamp::of(&after) == stamp).then_some(stamp),
    ))
}

/// Whether a file whose metadata is `meta` may be an input: a regular file within the cap.
fn admit(meta: &std::fs::Metadata) -> std::io::Result<()> {
    if !meta.is_file() {
        return Err(std::io::Error::other("not a file"));
    }
    if meta.len() > MAX_INPUT_BYTES {
        return Err(std::io::Error::other(format!(
            "over the input cap of {MAX_INPUT_BYTES} bytes"
        )));
    }
    Ok(())
}

/// The bytes of an open file whose metadata is `meta`, refused past the input cap.
fn read_open(file: &mut File, meta: &std::fs::Metadata) -> std::io::Result<Vec<u8>> {
    admit(meta)?;
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_INPUT_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_INPUT_BYTES {
        return Err(std::io::Error::other("grew past the input cap"));
    }
    Ok(bytes)
}

/// What an input file's metadata said when it was hashed. While the file still says the
/// same, its bytes are the ones hashed: every write moves its change time (`ctime`), which no
/// user can set back, and a file is stamped only if that time was at least [`SETTLED`] before
/// the read began, so that a later write cannot share its clock tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// File times come from a coarse clock; a second is far more than its tick.
const SETTLED: Duration = Duration::from_secs(1);

fn named(path: &Path, e: std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(dir: &Path, inputs: &str) -> (JobManifest, PathBuf) {
        std::fs::write(dir.join("m.wasm"), b"\0asm\x01\0\0\0").unwrap();
        let text = format!("name = \"t\"\nmodule = \"m.wasm\"\n{inputs}\n");
        let path = dir.join("job.toml");
        std::fs::write(&path, &text).unwrap();
        (JobManifest::load(&path).unwrap(), path)
    }

    #[test]
    fn json_lines_are_read_back_one_at_a_time_and_a_changed_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("in.jsonl"),
            "{\"b\": 2, \"a\": 1}\n\n  \n[1, 2]\n\"last\"",
        )
        .unwrap();
        let (m, path) = manifest(dir.path(), "[inputs]\njsonl = \"in.jsonl\"");
        let source = UnitSource::open(&m, &path).unwrap();
        assert_eq!(source.len(), 3);
        assert_eq!(source.input(0).unwrap(), br#"{"a":1,"b":2}"#);
        assert_eq!(source.input(1).unwrap(), b"[1,2]");
        assert_eq!(source.input(2).unwrap(), br#""last""#);
        assert_eq!(
            source.origin(1).unwrap(),
            serde_json::json!({"line": 4, "input": [1, 2]})
        );
        assert!(matches!(source.input(3), Err(InputError::NoSuchUnit(3))));
        assert_eq!(source.known(0), None);
        // The same bytes make the same digest; an edit makes another, and the open source
        // refuses to read on.
        let again = UnitSource::open(&m, &path).unwrap();
        assert_eq!(again.digest(), source.digest());
        std::fs::write(dir.path().join("in.jsonl"), "{\"a\": 9}\n").unwrap();
        assert!(matches!(source.input(0), Err(InputError::Changed { .. })));
        assert_ne!(
            UnitSource::open(&m, &path).unwrap().digest(),
            source.digest()
        );
    }

    #[test]
    fn a_bad_line_is_refused_up_front_with_its_number() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("in.jsonl"), "1\n2\n{oops\n").unwrap();
        let (m, path) = manifest(dir.path(), "[inputs]\njsonl = \"in.jsonl\"");
        let err = UnitSource::open(&m, &path).unwrap_err().to_string();
        assert!(err.contains("line 3"), "{err}");
    }

    #[test]
    fn a_settled_file_unchanged_since_it_was_hashed_is_served_without_a_second_hash() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.bin");
        std::fs::write(&path, vec![1u8; 4096]).unwrap();
        let invalid = |_: &str, problem: String| panic!("{problem}");
        // Just written: not settled for a second, so no stamp and every read is hashed.
        let fresh = UnitSource::files("f", vec![path.clone()], SETTLED, &invalid).unwrap();
        let Kind::Files(files) = &fresh.kind else {
            panic!("files")
        };
        assert!(files[0].stamp.is_none());
        // Counted as settled: stamped. A wrong digest in the record shows the read skips the
        // hash while the stamp matches...
        let mut source =
            UnitSource::files("f", vec![path.clone()], Duration::ZERO, &invalid).unwrap();
        let Kind::Files(files) = &mut source.kind else {
            panic!("files")
        };
        assert!(files[0].stamp.is_some());
        files[0].digest = Digest::of(b"not these bytes");
        assert_eq!(source.input(0).unwrap(), vec![1u8; 4096]);
        // ...and hashes once it does not: a write (same length) moves the change time.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&path, vec![2u8; 4096]).unwrap();
        assert!(matches!(source.input(0), Err(InputError::Changed { .. })));
    }

    #[test]
    fn input_files_are_hashed_once_and_checked_when_read() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.bin"), vec![1u8; 100]).unwrap();
        std::fs::write(dir.path().join("b.bin"), vec![2u8; 200_000]).unwrap();
        let (m, path) = manifest(dir.path(), "[inputs]\nfiles = [\"a.bin\", \"b.bin\"]");
        let source = UnitSource::open(&m, &path).unwrap();
        assert_eq!(source.len(), 2);
        assert_eq!(
            source.known(1),
            Some((200_000, Digest::of(&vec![2u8; 200_000])))
        );
        assert_eq!(source.input(0).unwrap(), vec![1u8; 100]);
        assert_eq!(
            source.origin(1).unwrap()["file"],
            dir.path().join("b.bin").display().to_string()
        );
        // Same length, other bytes: caught by the digest.
        std::fs::write(dir.path().join("b.bin"), vec![3u8; 200_000]).unwrap();
        let err = source.input(1).unwrap_err();
        assert!(matches!(err, InputError::Changed { .. }), "{err}");
        assert!(err.to_string().contains("b.bin changed"), "{err}");
        std::fs::remove_file(dir.path().join("a.bin")).unwrap();
        assert!(matches!(source.input(0), Err(InputError::Read { .. })));
    }

    #[test]
    fn large_files_hashed_from_a_mapping_get_the_digest_of_their_bytes() {
        let dir = tempfile::tempdir().unwrap();
        // Over the mapping threshold, not a whole number of chunks; and one just under it.
        let large: Vec<u8> = (0..(3 << 20) + 12_345u32)
            .map(|i| (i % 251) as u8)
            .collect();
        let small = vec![7u8; (MAP_AT_LEAST - 1) as usize];
        std::fs::write(dir.path().join("a.bin"), &large).unwrap();
        std::fs::write(dir.path().join("b.bin"), &small).unwrap();
        std::fs::write(dir.path().join("c.bin"), b"").unwrap();
        let (m, path) = manifest(
            dir.path(),
            "[inputs]\nfiles = [\"a.bin\", \"b.bin\", \"c.bin\"]",
        );
        let source = UnitSource::open(&m, &path).unwrap();
        assert_eq!(
            source.known(0),
            Some((large.len() as u64, Digest::of(&large)))
        );
        assert_eq!(
            source.known(1),
            Some((small.len() as u64, Digest::of(&small)))
        );
        assert_eq!(source.known(2), Some((0, Digest::of(b""))));
        assert_eq!(source.input(0).unwrap(), large);
    }

    #[test]
    fn a_sweep_of_a_hundred_million_points_is_computed_not_held() {
        let dir = tempfile::tempdir().unwrap();
        let (m, path) = manifest(
            dir.path(),
            "[inputs.sweep]\nseed = { start = 1, stop = 100000000, step = 1 }\nscale = 0.5",
        );
        let source = UnitSource::open(&m, &path).unwrap();
        assert_eq!(source.len(), 100_000_000);
        assert_eq!(
            source.input(99_999_999).unwrap(),
            br#"{"scale":0.5,"seed":100000000}"#
        );
        assert_eq!(
            source.origin(0).unwrap(),
            serde_json::json!({"params": {"scale": 0.5, "seed": 1}})
        );
        assert!(source.input(100_000_000).is_err());
        // Twice as many points is refused, naming the cap.
        std::fs::write(
            &path,
            "name = \"t\"\nmodule = \"m.wasm\"\n[inputs.sweep]\n\
             seed = { start = 1, stop = 100000000, step = 1 }\nscale = [0.5, 1.0]\n",
        )
        .unwrap();
        let err = JobManifest::load(&path).unwrap_err().to_string();
        assert!(err.contains("100000000 points"), "{err}");
    }
}
