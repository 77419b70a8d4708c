//! Compiled modules, cached by content hash in memory and on disk.
//!
//! Loading machine code is `unsafe`: a file that was not produced by this peer's own engine could
//! run anything. Every artifact on disk therefore carries a MAC keyed with a secret that only this
//! peer's data directory holds; a file without a valid MAC (copied in, truncated, tampered with,
//! or written by another peer) is ignored and the module is compiled afresh.

use std::collections::{HashMap, VecDeque};
use std::fs;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use wasmtime::{Engine, Module};

use crate::digest::Digest;

const MAGIC: &[u8; 8] = b"cfmod\x01\0\0";
const KEY_FILE: &str = "artifact.key";

/// Compiled artifacts on disk, in one directory per engine build.
#[derive(Debug)]
pub(crate) struct DiskCache {
    dir: PathBuf,
    key: [u8; 32],
}

impl DiskCache {
    /// Opens (creating if needed) the cache under `root`, keyed for `engine`'s compiled-code
    /// compatibility.
    pub(crate) fn open(root: &Path, engine: &Engine, tag: &str) -> std::io::Result<Self> {
        fs::create_dir_all(root)?;
        let key = load_or_create_key(&root.join(KEY_FILE))?;
        let mut hasher = std::hash::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let dir = root.join(format!("{tag}-{:016x}", hasher.finish()));
        fs::create_dir_all(&dir)?;
        Ok(Self { dir, key })
    }

    fn path(&self, digest: &Digest) -> PathBuf {
        self.dir.join(format!("{}.cwasm", digest.to_hex()))
    }

    fn mac(&self, digest: &Digest, artifact: &[u8]) -> [u8; 32] {
        let mut hasher = blake3::Hasher::new_keyed(&self.key);
        hasher.update(&digest.0);
        hasher.update(artifact);
        *hasher.finalize().as_bytes()
    }

    /// The module compiled earlier by this peer for `digest`, if a valid artifact is on disk.
    pub(crate) fn load(&self, engine: &Engine, digest: &Digest) -> Option<Module> {
        let bytes = fs::read(self.path(digest)).ok()?;
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
            Ok(module) => Some(module),
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
            .open(self.dir.join(format!("{}.lock", digest.to_hex())))
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
            file.sync_all()?;
            fs::rename(&tmp, &path)
        })();
        if let Err(err) = written {
            let _ = fs::remove_file(&tmp);
            tracing::warn!(module = %digest, %err, "cannot write a compiled module to the cache");
        }
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

        let cache = DiskCache::open(dir.path(), &engine, "t").unwrap();
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
        let foreign = DiskCache::open(other.path(), &engine, "t").unwrap();
        foreign.store(&digest, &module);
        fs::copy(foreign.path(&digest), cache.path(&digest)).unwrap();
        assert!(cache.load(&engine, &digest).is_none());

        // Garbage of any length is ignored, never loaded.
        for len in [0, 5, 8, 40, 100] {
            fs::write(cache.path(&digest), vec![0xAB; len]).unwrap();
            assert!(cache.load(&engine, &digest).is_none());
        }
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
