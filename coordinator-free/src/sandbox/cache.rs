//! Compiled modules, cached by content hash in memory and on disk.
//!
//! Loading machine code is `unsafe`: a file that was not produced by this peer's own engine could
//! run anything. Every artifact on disk therefore carries a MAC keyed with a secret that only this
//! peer's data directory holds; a file without a valid MAC (copied in, truncated, tampered with,
//! or written by another peer) is ignored and the module is compiled afresh.
//!
//! The disk cache is capped in bytes. Every artifact's modification time says when it was last
//! written or loaded, and a write that takes the cache over its cap removes the least recently
//! used artifacts first. Several unit hosts share one cache directory: writes are atomic (a
//! temporary file renamed into place, so a half-written artifact is never seen under its name),
//! and an artifact removed while another process reads it stays readable to that reader (its
//! file is unlinked, not truncated), so eviction costs another host at most a recompile.

use std::collections::{HashMap, VecDeque};
use std::fs;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use wasmtime::{Engine, Module};

use crate::digest::Digest;

const MAGIC: &[u8; 8] = b"cfmod\x01\0\0";
const KEY_FILE: &str = "artifact.key";
/// Held while one process evicts, so two writers do not both remove artifacts for one excess.
const EVICT_LOCK: &str = "evict.lock";
const ARTIFACT: &str = "cwasm";
const LOCK: &str = "lock";
/// Temporary files and compile locks left this long are leftovers of a writer that died, or of
/// a module that never compiled; eviction removes them.
const LEFTOVER_AGE: Duration = Duration::from_secs(600);

/// Bytes of compiled artifacts kept on disk when nothing else is said.
pub const DEFAULT_DISK_CACHE_BYTES: u64 = 1 << 30;

/// Compiled artifacts on disk, in one directory per engine build.
#[derive(Debug)]
pub(crate) struct DiskCache {
    root: PathBuf,
    dir: PathBuf,
    key: [u8; 32],
    /// Most bytes of artifacts under `root`, every engine build's directory together.
    max_bytes: u64,
}

impl DiskCache {
    /// Opens (creating if needed) the cache under `root`, keyed for `engine`'s compiled-code
    /// compatibility, holding at most `max_bytes` of artifacts.
    pub(crate) fn open(
        root: &Path,
        engine: &Engine,
        tag: &str,
        max_bytes: u64,
    ) -> std::io::Result<Self> {
        fs::create_dir_all(root)?;
        let key = load_or_create_key(&root.join(KEY_FILE))?;
        let mut hasher = std::hash::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let dir = root.join(format!("{tag}-{:016x}", hasher.finish()));
        fs::create_dir_all(&dir)?;
        Ok(Self {
            root: root.to_owned(),
            dir,
            key,
            max_bytes,
        })
    }

    fn path(&self, digest: &Digest) -> PathBuf {
        self.dir.join(format!("{}.{ARTIFACT}", digest.to_hex()))
    }

    fn mac(&self, digest: &Digest, artifact: &[u8]) -> [u8; 32] {
        let mut hasher = blake3::Hasher::new_keyed(&self.key);
        hasher.update(&digest.0);
        hasher.update(artifact);
        *hasher.finalize().as_bytes()
    }

    /// The module compiled earlier by this peer for `digest`, if a valid artifact is on disk.
    pub(crate) fn load(&self, engine: &Engine, digest: &Digest) -> Option<Module> {
        use std::io::Read;
        let mut file = fs::File::open(self.path(digest)).ok()?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).ok()?;
        let rest = bytes.strip_prefix(MAGIC.as_slice())?;
        let (mac, artifact) = rest.split_at_checked(32)?;
        let expected = self.mac(digest, artifact);
        if !constant_time_eq(mac, &expected) {
            tracing::warn!(module = %digest, "ignoring a cached artifact with a bad MAC");
            return None;
        }
        // SAFETY: the MAC proves this peer wrote these bytes with `Module::serialize` for this
        // engine configuration (the directory is per compatibility hash); wasmtime checks the
        // engine compatibility once more itself.
        match unsafe { Module::deserialize(engine, artifact) } {
            Ok(module) => {
                // Recently used, so eviction keeps it longer. A failure only makes it look older.
                let _ = file.set_modified(SystemTime::now());
                Some(module)
            }
            Err(err) => {
                tracing::warn!(module = %digest, %err, "ignoring an unloadable cached artifact");
                None
            }
        }
    }

    /// Waits for, then holds, this cache's compile lock for `digest` until the file is dropped
    /// (an advisory lock on `<digest>.lock`, which the kernel releases if the holder dies).
    /// `None` when the lock cannot be had: the caller then compiles without it.
    pub(crate) fn compile_lock(&self, digest: &Digest) -> Option<fs::File> {
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.dir.join(format!("{}.{LOCK}", digest.to_hex())))
            .ok()?;
        file.lock().ok()?;
        Some(file)
    }

    /// Writes `module`'s artifact for `digest`; failures only cost a later recompile.
    pub(crate) fn store(&self, digest: &Digest, module: &Module) {
        let artifact = match module.serialize() {
            Ok(a) => a,
            Err(err) => {
                tracing::warn!(module = %digest, %err, "cannot serialize a compiled module");
                return;
            }
        };
        let size = (MAGIC.len() + 32 + artifact.len()) as u64;
        if size > self.max_bytes {
            tracing::warn!(
                module = %digest,
                size,
                cap = self.max_bytes,
                "a compiled module is larger than the whole disk cache; not kept"
            );
            return;
        }
        let mac = self.mac(digest, &artifact);
        let path = self.path(digest);
        // Unique per writer: threads of one process share the pid.
        static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = path.with_extension(format!("tmp{}-{n}", std::process::id()));
        let written = (|| {
            let mut file = fs::File::create(&tmp)?;
            file.write_all(MAGIC)?;
            file.write_all(&mac)?;
            file.write_all(&artifact)?;
            // Stamped from the same clock as a load, so the two order by use.
            file.set_modified(SystemTime::now())?;
            file.sync_all()?;
            fs::rename(&tmp, &path)
        })();
        if let Err(err) = written {
            let _ = fs::remove_file(&tmp);
            tracing::warn!(module = %digest, %err, "cannot write a compiled module to the cache");
            return;
        }
        self.evict(&path);
    }

    /// Removes the least recently used artifacts until those left fit in the cap; `keep` (the
    /// artifact just written) stays. Also removes leftovers: temporary files of writers that
    /// died and compile locks of modules that left no artifact.
    fn evict(&self, keep: &Path) {
        // Without the lock two writers may each remove artifacts for one excess: wasteful, not
        // wrong, so a lock that cannot be had does not stop eviction.
        let _evicting = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.root.join(EVICT_LOCK))
            .and_then(|file| file.lock().map(|()| file));
        let now = SystemTime::now();
        let old = |modified: SystemTime| {
            now.duration_since(modified)
                .is_ok_and(|age| age > LEFTOVER_AGE)
        };
        let mut artifacts = Vec::new();
        let mut total = 0u64;
        let Ok(builds) = fs::read_dir(&self.root) else {
            return;
        };
        for build in builds.flatten() {
            if !build.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let Ok(files) = fs::read_dir(build.path()) else {
                continue;
            };
            for file in files.flatten() {
                let path = file.path();
                let Ok(meta) = file.metadata() else {
                    continue;
                };
                let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                match path.extension().and_then(|e| e.to_str()) {
                    Some(ARTIFACT) => {
                        total += meta.len();
                        if path != keep {
                            artifacts.push((modified, meta.len(), path));
                        }
                    }
                    Some(LOCK) if old(modified) && !path.with_extension(ARTIFACT).exists() => {
                        remove_lock(&path);
                    }
                    Some(ext) if ext.starts_with("tmp") && old(modified) => {
                        let _ = fs::remove_file(&path);
                    }
                    _ => {}
                }
            }
        }
        if total <= self.max_bytes {
            return;
        }
        artifacts.sort();
        for (_, size, path) in artifacts {
            if total <= self.max_bytes {
                break;
            }
            match fs::remove_file(&path) {
                Ok(()) => {
                    total -= size;
                    remove_lock(&path.with_extension(LOCK));
                }
                // Another process removed it first.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => total -= size,
                Err(_) => {}
            }
        }
        tracing::debug!(
            bytes = total,
            cap = self.max_bytes,
            "evicted compiled modules"
        );
    }
}

/// Removes a compile lock that nobody holds. A process that opened it just before may still
/// lock the removed file while another creates a new one; the two then compile the same module
/// at once, which costs time, never correctness (artifacts are renamed into place whole).
fn remove_lock(path: &Path) {
    if let Ok(file) = fs::OpenOptions::new().write(true).open(path)
        && file.try_lock().is_ok()
    {
        let _ = fs::remove_file(path);
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn load_or_create_key(path: &Path) -> std::io::Result<[u8; 32]> {
    if let Ok(bytes) = fs::read(path)
        && let Ok(key) = <[u8; 32]>::try_from(bytes.as_slice())
    {
        return Ok(key);
    }
    let mut key = [0u8; 32];
    fill_random(&mut key)?;
    // Unique per attempt (threads of one process share the pid).
    let nonce = u64::from_le_bytes([
        key[0], key[1], key[2], key[3], key[4], key[5], key[6], key[7],
    ]);
    let tmp = path.with_extension(format!("tmp{}-{nonce:016x}", std::process::id()));
    {
        let mut options = fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&tmp)?;
        file.write_all(&key)?;
        file.sync_all()?;
    }
    // A hard link never replaces an existing file: when several unit hosts start at once, the
    // first key linked wins and every process then reads that one. (A rename would let a later
    // process replace a key that others already use, and their artifacts would stop verifying.)
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(key),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let bytes = fs::read(path)?;
            <[u8; 32]>::try_from(bytes.as_slice())
                .map_err(|_| std::io::Error::other("the artifact key file is damaged"))
        }
        Err(e) => Err(e),
    }
}

fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    use std::io::Read;
    fs::File::open("/dev/urandom")?.read_exact(buf)
}

/// A bounded in-memory map from module digest to compiled, pre-linked module.
#[derive(Debug)]
pub(crate) struct MemoryCache<V> {
    inner: Mutex<MemoryCacheInner<V>>,
    capacity: usize,
}

#[derive(Debug)]
struct MemoryCacheInner<V> {
    map: HashMap<Digest, Arc<V>>,
    order: VecDeque<Digest>,
}

impl<V> MemoryCache<V> {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            inner: Mutex::new(MemoryCacheInner {
                map: HashMap::new(),
                order: VecDeque::new(),
            }),
            capacity: capacity.max(1),
        }
    }

    pub(crate) fn get(&self, digest: &Digest) -> Option<Arc<V>> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.map.get(digest).cloned()
    }

    pub(crate) fn insert(&self, digest: Digest, value: Arc<V>) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if inner.map.insert(digest, value).is_none() {
            inner.order.push_back(digest);
        }
        // Oldest first: a peer works on few jobs at a time, so insertion order is a fair guess
        // at what is no longer needed.
        while inner.map.len() > self.capacity {
            match inner.order.pop_front() {
                Some(old) => {
                    inner.map.remove(&old);
                }
                None => break,
            }
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_cache_is_bounded() {
        let cache = MemoryCache::new(2);
        for i in 0..5u8 {
            cache.insert(Digest::of(&[i]), Arc::new(i));
        }
        assert_eq!(cache.len(), 2);
        assert!(cache.get(&Digest::of(&[0])).is_none());
        assert_eq!(cache.get(&Digest::of(&[4])).as_deref(), Some(&4));
    }

    #[test]
    fn tampered_or_foreign_artifacts_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::default();
        let wasm = wat::parse_str("(module (func (export \"f\")))").unwrap();
        let digest = Digest::of(&wasm);
        let module = Module::new(&engine, &wasm).unwrap();

        let cache = DiskCache::open(dir.path(), &engine, "t", DEFAULT_DISK_CACHE_BYTES).unwrap();
        cache.store(&digest, &module);
        assert!(cache.load(&engine, &digest).is_some());

        // Flip one byte of the machine code: the MAC no longer matches.
        let path = cache.path(&digest);
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        fs::write(&path, &bytes).unwrap();
        assert!(cache.load(&engine, &digest).is_none());

        // An artifact written under another key (another peer's cache) is not loaded either.
        let other = tempfile::tempdir().unwrap();
        let foreign =
            DiskCache::open(other.path(), &engine, "t", DEFAULT_DISK_CACHE_BYTES).unwrap();
        foreign.store(&digest, &module);
        fs::copy(foreign.path(&digest), cache.path(&digest)).unwrap();
        assert!(cache.load(&engine, &digest).is_none());

        // Garbage of any length is ignored, never loaded.
        for len in [0, 5, 8, 40, 100] {
            fs::write(cache.path(&digest), vec![0xAB; len]).unwrap();
            assert!(cache.load(&engine, &digest).is_none());
        }
    }

    /// Bytes of artifacts under `root`, every build's directory together.
    fn artifact_bytes(root: &Path) -> u64 {
        fs::read_dir(root)
            .unwrap()
            .flatten()
            .filter(|d| d.file_type().unwrap().is_dir())
            .flat_map(|d| fs::read_dir(d.path()).unwrap().flatten())
            .filter(|f| f.path().extension().is_some_and(|e| e == ARTIFACT))
            .map(|f| f.metadata().unwrap().len())
            .sum()
    }

    #[test]
    fn the_disk_cache_stays_under_its_cap_and_keeps_what_was_used_last() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::default();
        let compiled: Vec<(Digest, Module)> = (0..12)
            .map(|i| {
                let wasm = wat::parse_str(format!(
                    "(module (func (export \"f\") (result i32) i32.const {i}))"
                ))
                .unwrap();
                (Digest::of(&wasm), Module::new(&engine, &wasm).unwrap())
            })
            .collect();
        let one = {
            let probe = tempfile::tempdir().unwrap();
            let cache = DiskCache::open(probe.path(), &engine, "t", u64::MAX).unwrap();
            cache.store(&compiled[0].0, &compiled[0].1);
            artifact_bytes(probe.path())
        };
        // Room for four artifacts of this size (they differ by a few bytes at most).
        let cap = 4 * one + one / 2;
        let cache = DiskCache::open(dir.path(), &engine, "t", cap).unwrap();
        // Two writers share the directory, as a peer's unit hosts do.
        let other = DiskCache::open(dir.path(), &engine, "t", cap).unwrap();
        let (hot, _) = &compiled[0];
        for (i, (digest, module)) in compiled.iter().enumerate() {
            let writer = if i % 2 == 0 { &cache } else { &other };
            writer.store(digest, module);
            assert!(
                artifact_bytes(dir.path()) <= cap,
                "over the cap after {} stores",
                i + 1
            );
            // The first module is used all along.
            assert!(
                cache.load(&engine, hot).is_some(),
                "lost the hot module at {i}"
            );
        }
        // Kept: the one in use and the last three written. Gone: the rest, and their locks.
        let kept: Vec<usize> = (0..compiled.len())
            .filter(|&i| cache.path(&compiled[i].0).exists())
            .collect();
        assert_eq!(kept, [0, 9, 10, 11]);
        for (digest, _) in &compiled[1..9] {
            assert!(cache.load(&engine, digest).is_none());
        }

        // A module larger than the whole cap is not kept at all; what was there stays.
        let tiny = DiskCache::open(dir.path(), &engine, "t", one / 2).unwrap();
        tiny.store(&compiled[1].0, &compiled[1].1);
        assert!(!tiny.path(&compiled[1].0).exists());
        assert!(cache.path(hot).exists());
    }

    #[test]
    fn eviction_removes_leftovers_of_writers_that_died() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::default();
        let cache = DiskCache::open(dir.path(), &engine, "t", DEFAULT_DISK_CACHE_BYTES).unwrap();
        let wasm = wat::parse_str("(module)").unwrap();
        let digest = Digest::of(&wasm);
        let old = SystemTime::now() - 2 * LEFTOVER_AGE;
        let leftover = |name: &str, modified: SystemTime| {
            let path = cache.dir.join(name);
            fs::File::create(&path)
                .unwrap()
                .set_modified(modified)
                .unwrap();
            path
        };
        let dead_write = leftover("aa.tmp123-0", old);
        let live_write = leftover("bb.tmp123-1", SystemTime::now());
        let dead_lock = leftover("cc.lock", old);
        let held_lock = leftover("dd.lock", old);
        let holder = fs::OpenOptions::new().write(true).open(&held_lock).unwrap();
        holder.lock().unwrap();
        cache.store(&digest, &Module::new(&engine, &wasm).unwrap());
        assert!(!dead_write.exists());
        assert!(live_write.exists(), "a write under way is left alone");
        assert!(!dead_lock.exists());
        assert!(held_lock.exists(), "a lock somebody holds is left alone");
        assert!(cache.load(&engine, &digest).is_some());
    }

    #[test]
    fn racing_processes_agree_on_one_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(KEY_FILE);
        let keys: Vec<[u8; 32]> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| load_or_create_key(&path).unwrap()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let on_disk = load_or_create_key(&path).unwrap();
        assert!(
            keys.iter().all(|k| *k == on_disk),
            "every caller uses the key on disk"
        );
    }

    #[test]
    fn key_is_private_and_stable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(KEY_FILE);
        let a = load_or_create_key(&path).unwrap();
        let b = load_or_create_key(&path).unwrap();
        assert_eq!(a, b);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
