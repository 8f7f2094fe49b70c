//! The adapter registry and its bytes-capped cache (registered adapters by version, and the
//! combinations of them requests asked for).

use super::host_tier::HostTier;
use super::metrics::AdapterMetrics;
use super::valid_name;
use crate::lora::{combine, CombineOptions, LoraAdapter, LoraStack};
use crate::model::{LlamaConfig, Placement};
use moka::future::Cache;
use moka::notification::RemovalCause;
use std::collections::{BTreeMap, HashMap};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// A loaded adapter with its ready-to-use single-adapter stack.
#[derive(Debug)]
pub struct CachedAdapter {
    pub adapter: Arc<LoraAdapter>,
    /// The adapter alone at weight 1; shared by all requests for it so they batch as one group.
    pub stack: Arc<LoraStack>,
    /// The registered version (0 for a combination).
    pub version: u64,
}

/// What the cache holds an entry under.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum CacheKey {
    /// A registered adapter at one version.
    Adapter(String, u64),
    /// A combination: each member's `(name, version, weight's bits)` in order, and the method
    /// with the parameters that change its result (`CombineOptions::key`).
    Combined(Vec<(String, u64, u64)>, String),
}

impl CachedAdapter {
    /// Bytes of device memory the adapter holds (its stack on a GPU; 0 on the CPU).
    pub fn device_bytes(&self) -> usize {
        match self.stack.on_cpu() {
            true => 0,
            false => self.stack.bytes(),
        }
    }
}

/// Why an adapter could not be served.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("adapter `{0}` does not exist")]
    NotFound(String),
    #[error("invalid adapter name `{0}`: use 1-64 characters from A-Z a-z 0-9 . _ -")]
    BadName(String),
    #[error("{0}")]
    BadPath(String),
    #[error("adapter `{name}` cannot be loaded: {reason}")]
    Invalid { name: String, reason: String },
    /// The adapters cannot be combined that way (unequal ranks, a rank too large, ...).
    #[error("cannot combine the adapters: {0}")]
    BadCombination(String),
}

/// What the admin API shows for one adapter.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AdapterSummary {
    pub name: String,
    pub path: PathBuf,
    pub version: u64,
    /// `loaded` when in the cache, else `on-disk`.
    pub state: &'static str,
    pub rank: Option<usize>,
    pub alpha: Option<f64>,
    pub targets: Option<Vec<String>>,
    pub bytes: Option<usize>,
    pub requests: u64,
    /// Unix seconds of the last request, if any.
    pub last_used: Option<u64>,
}

#[derive(Clone, Debug)]
struct Record {
    path: PathBuf,
    version: u64,
    requests: u64,
    last_used: Option<u64>,
    /// Filled in on first load.
    info: Option<(usize, f64, Vec<String>, usize)>,
}

/// Named adapters, their versions, and the cache of loaded ones.
pub struct AdapterRegistry {
    dir: PathBuf,
    allow_outside: bool,
    base: LlamaConfig,
    /// Where the base's weights live: cached stacks are built there.
    placement: Placement,
    records: RwLock<BTreeMap<String, Record>>,
    cache: Cache<CacheKey, Arc<CachedAdapter>>,
    /// Parsed adapters kept behind the cache (`host_tier`).
    host: HostTier,
    alive: Mutex<HashMap<CacheKey, Weak<CachedAdapter>>>,
    next_version: AtomicU64,
    metrics: Arc<AdapterMetrics>,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What one cached adapter weighs against the byte cap: its host tensors, plus its stack's copy
/// when that lives on a GPU (device memory is what the cap protects there).
fn cached_bytes(c: &CachedAdapter) -> u32 {
    u32::try_from(c.adapter.bytes() + c.device_bytes()).unwrap_or(u32::MAX)
}

impl AdapterRegistry {
    /// A registry over `dir` (created if missing) whose cache holds at most `cache_bytes` bytes.
    pub fn new(
        dir: PathBuf,
        allow_outside: bool,
        base: LlamaConfig,
        placement: Placement,
        cache_bytes: u64,
        metrics: Arc<AdapterMetrics>,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&dir).map_err(|e| {
            anyhow::anyhow!("cannot create adapters directory {}: {e}", dir.display())
        })?;
        let dir = dir.canonicalize()?;
        let evictions = metrics.evictions.clone();
        let cache = Cache::builder()
            .max_capacity(cache_bytes)
            .weigher(|_k: &CacheKey, v: &Arc<CachedAdapter>| cached_bytes(v))
            .eviction_listener(move |_k, _v, cause| {
                if cause == RemovalCause::Size {
                    evictions.inc();
                }
            })
            .support_invalidation_closures()
            .build();
        Ok(Self {
            dir,
            allow_outside,
            base,
            placement,
            records: RwLock::new(BTreeMap::new()),
            cache,
            host: HostTier::new(0),
            alive: Mutex::new(HashMap::new()),
            next_version: AtomicU64::new(1),
            metrics,
        })
    }

    /// Keeps up to `bytes` of parsed adapters behind the cache (0, the default: none), so that an
    /// evicted adapter used again is rebuilt from memory, not read from its folder.
    pub fn with_host_tier(mut self, bytes: u64) -> Self {
        self.host = HostTier::new(bytes);
        self
    }

    /// The adapters directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Registers every subfolder of the adapters directory that holds an `adapter_config.json`
    /// (validation happens on first use).
    pub fn scan(&self) -> anyhow::Result<usize> {
        let mut n = 0;
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let path = entry.path();
            let Some(name) = path
                .file_name()
                .and_then(|n| n.to_str())
                .map(str::to_string)
            else {
                continue;
            };
            if !path.join("adapter_config.json").is_file() {
                continue;
            }
            if !valid_name(&name) {
                tracing::warn!("skipping adapter folder `{name}`: not a valid adapter name");
                continue;
            }
            // The same rule as registration: a folder (or symlink) that resolves outside the
            // adapters directory is served only with `allow_adapter_paths_outside`.
            let path = match self.resolve_path(&name) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!("skipping adapter folder `{name}` ({}): {e}", path.display());
                    continue;
                }
            };
            self.insert_record(&name, path);
            n += 1;
        }
        Ok(n)
    }

    fn insert_record(&self, name: &str, path: PathBuf) -> u64 {
        let version = self.next_version.fetch_add(1, Ordering::SeqCst);
        let mut recs = self.records.write().unwrap_or_else(|e| e.into_inner());
        recs.insert(
            name.to_string(),
            Record {
                path,
                version,
                requests: 0,
                last_used: None,
                info: None,
            },
        );
        version
    }

    pub fn contains(&self, name: &str) -> bool {
        self.records
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(name)
    }

    /// Resolves a client-given path: relative paths are inside the adapters directory; `..` and
    /// paths outside the directory are refused unless the server allows them.
    pub fn resolve_path(&self, path: &str) -> Result<PathBuf, AdapterError> {
        let p = Path::new(path);
        if p.components().any(|c| matches!(c, Component::ParentDir)) && !self.allow_outside {
            return Err(AdapterError::BadPath(format!(
                "adapter path `{path}` contains `..`; paths must stay inside the adapters directory"
            )));
        }
        let full = if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.dir.join(p)
        };
        let canon = full
            .canonicalize()
            .map_err(|_| AdapterError::BadPath(format!("adapter path `{path}` does not exist")))?;
        if !self.allow_outside && !canon.starts_with(&self.dir) {
            return Err(AdapterError::BadPath(format!(
                "adapter path `{path}` is outside the adapters directory (start the server with \
                 --allow-adapter-paths-outside to permit it)"
            )));
        }
        Ok(canon)
    }

    /// `text` with the server's absolute paths taken out (for answers to clients; the log keeps
    /// them): paths inside the adapters directory become relative to it, an adapter folder
    /// outside it becomes its folder name.
    pub fn without_paths(&self, text: &str, adapter_dir: &Path) -> String {
        let mut out = text.to_string();
        if !adapter_dir.starts_with(&self.dir) {
            let shown = adapter_dir
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            out = out.replace(&adapter_dir.display().to_string(), &shown);
        }
        out = out.replace(&format!("{}/", self.dir.display()), "");
        out.replace(&self.dir.display().to_string(), "<adapters_dir>")
    }

    /// How a client that is not an admin sees an adapter's path: relative to the adapters
    /// directory, or the folder's name when it lives outside.
    pub fn shown_path(&self, path: &Path) -> PathBuf {
        match path.strip_prefix(&self.dir) {
            Ok(rel) => rel.to_path_buf(),
            Err(_) => path.file_name().map(PathBuf::from).unwrap_or_default(),
        }
    }

    /// Registers (or replaces) adapter `name` at `path`, loading and validating it first.
    pub async fn register(&self, name: &str, path: &str) -> Result<AdapterSummary, AdapterError> {
        if !valid_name(name) {
            return Err(AdapterError::BadName(name.to_string()));
        }
        let dir = self.resolve_path(path)?;
        let version = self.next_version.fetch_add(1, Ordering::SeqCst);
        let loaded = self.load(name, dir.clone(), version).await?;
        let old = {
            let mut recs = self.records.write().unwrap_or_else(|e| e.into_inner());
            let info = Self::info_of(&loaded);
            recs.insert(
                name.to_string(),
                Record {
                    path: dir,
                    version,
                    requests: 0,
                    last_used: None,
                    info: Some(info),
                },
            )
        };
        if let Some(old) = old {
            // Running sequences keep their Arc; new requests get the new version.
            self.forget(name, old.version).await;
        }
        let key = CacheKey::Adapter(name.to_string(), version);
        self.cache.insert(key.clone(), loaded).await;
        self.remember(key.clone(), &self.cache.get(&key).await);
        self.summary(name)
            .await
            .ok_or_else(|| AdapterError::NotFound(name.to_string()))
    }

    /// Unregisters `name` (its files stay on disk). Running sequences finish with it.
    pub async fn remove(&self, name: &str) -> Result<(), AdapterError> {
        let rec = self
            .records
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name)
            .ok_or_else(|| AdapterError::NotFound(name.to_string()))?;
        self.forget(name, rec.version).await;
        Ok(())
    }

    /// Drops `name` at `version` from the cache, and every combination built from it.
    async fn forget(&self, name: &str, version: u64) {
        self.cache
            .invalidate(&CacheKey::Adapter(name.to_string(), version))
            .await;
        self.host.forget(name, version).await;
        self.metrics.host_bytes.set(self.host.bytes() as i64);
        let name = name.to_string();
        let stale = move |k: &CacheKey, _: &Arc<CachedAdapter>| match k {
            CacheKey::Combined(members, _) => {
                members.iter().any(|(n, v, _)| *n == name && *v == version)
            }
            CacheKey::Adapter(..) => false,
        };
        if let Err(e) = self.cache.invalidate_entries_if(stale) {
            tracing::warn!("cannot drop the combinations of a replaced adapter: {e}");
        }
    }

    fn info_of(c: &CachedAdapter) -> (usize, f64, Vec<String>, usize) {
        let a = &c.adapter;
        let targets = a.targets().into_iter().map(str::to_string).collect();
        (a.config.r, a.config.lora_alpha, targets, a.bytes())
    }

    fn remember(&self, key: CacheKey, c: &Option<Arc<CachedAdapter>>) {
        if let Some(c) = c {
            let mut alive = self.alive.lock().unwrap_or_else(|e| e.into_inner());
            alive.retain(|_, w| w.strong_count() > 0);
            alive.insert(key, Arc::downgrade(c));
        }
    }

    /// The cached entry under `key`, or the same copy still in use by running sequences (put
    /// back into the cache); counts the hit.
    async fn cached(&self, key: &CacheKey) -> Option<Arc<CachedAdapter>> {
        if let Some(c) = self.cache.get(key).await {
            self.metrics.hits.inc();
            return Some(c);
        }
        let in_use = self
            .alive
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .and_then(Weak::upgrade)?;
        // Evicted while sequences still use it: put the same copy back.
        self.metrics.hits.inc();
        self.cache.insert(key.clone(), in_use.clone()).await;
        Some(in_use)
    }

    async fn load(
        &self,
        name: &str,
        dir: PathBuf,
        version: u64,
    ) -> Result<Arc<CachedAdapter>, AdapterError> {
        let base = self.base.clone();
        let at = self.placement.clone();
        let n = name.to_string();
        let path = dir.clone();
        let t0 = Instant::now();
        let kept = self.host.get(name, version).await;
        let from_tier = kept.is_some();
        if from_tier {
            self.metrics.host_hits.inc();
        }
        let res = tokio::task::spawn_blocking(move || -> anyhow::Result<CachedAdapter> {
            let adapter = match kept {
                Some(a) => a,
                None => Arc::new(LoraAdapter::load(&n, &dir, &base)?),
            };
            let stack = Arc::new(LoraStack::new_on(
                vec![(adapter.clone(), 1.0)],
                base.num_hidden_layers,
                &at,
            )?);
            Ok(CachedAdapter {
                adapter,
                stack,
                version,
            })
        })
        .await;
        // Read from the folder: kept for its next reload (a tier hit is already there).
        if let (false, Ok(Ok(c))) = (from_tier, &res) {
            self.host.insert(name, version, c.adapter.clone()).await;
            self.metrics.host_bytes.set(self.host.bytes() as i64);
        }
        self.metrics
            .load_seconds
            .observe(t0.elapsed().as_secs_f64());
        match res {
            Ok(Ok(c)) => Ok(Arc::new(c)),
            Ok(Err(e)) => {
                let reason = format!("{e:#}");
                tracing::warn!(adapter = name, path = %path.display(), "adapter refused: {reason}");
                Err(AdapterError::Invalid {
                    name: name.to_string(),
                    reason: self.without_paths(&reason, &path),
                })
            }
            Err(e) => Err(AdapterError::Invalid {
                name: name.to_string(),
                reason: format!("loader failed: {e}"),
            }),
        }
    }

    /// The loaded adapter `name` (current version), loading it on a miss. Counts the request.
    pub async fn get(&self, name: &str) -> Result<Arc<CachedAdapter>, AdapterError> {
        let (path, version) = {
            let mut recs = self.records.write().unwrap_or_else(|e| e.into_inner());
            let rec = recs
                .get_mut(name)
                .ok_or_else(|| AdapterError::NotFound(name.to_string()))?;
            rec.requests += 1;
            rec.last_used = Some(now_secs());
            (rec.path.clone(), rec.version)
        };
        let key = CacheKey::Adapter(name.to_string(), version);
        if let Some(c) = self.cached(&key).await {
            return Ok(c);
        }
        self.metrics.misses.inc();
        let c = self
            .cache
            .try_get_with(key.clone(), self.load(name, path, version))
            .await
            .map_err(|e| match e.as_ref() {
                AdapterError::Invalid { name, reason } => AdapterError::Invalid {
                    name: name.clone(),
                    reason: reason.clone(),
                },
                other => AdapterError::Invalid {
                    name: name.to_string(),
                    reason: other.to_string(),
                },
            })?;
        self.remember(key, &Some(c.clone()));
        {
            let mut recs = self.records.write().unwrap_or_else(|e| e.into_inner());
            if let Some(rec) = recs.get_mut(name) {
                rec.info = Some(Self::info_of(&c));
            }
        }
        self.cache.run_pending_tasks().await;
        self.metrics.bytes.set(self.cache.weighted_size() as i64);
        Ok(c)
    }

    /// The combination of registered adapters (`(name, weight)`, in order) by `opts`: computed
    /// once per (names, versions, weights, method and parameters) in a blocking task, off the
    /// scheduler thread, then cached like an adapter (its bytes count against the cap). A
    /// replaced or removed member drops the combinations built from it.
    pub async fn combined(
        &self,
        members: &[(String, f64)],
        opts: &CombineOptions,
    ) -> Result<Arc<CachedAdapter>, AdapterError> {
        let mut loaded = Vec::with_capacity(members.len());
        let mut parts = Vec::with_capacity(members.len());
        for (name, weight) in members {
            let c = self.get(name).await?;
            parts.push((name.clone(), c.version, weight.to_bits()));
            loaded.push((c.adapter.clone(), *weight));
        }
        let key = CacheKey::Combined(parts, opts.key());
        if let Some(c) = self.cached(&key).await {
            return Ok(c);
        }
        self.metrics.misses.inc();
        let terms: Vec<String> = members.iter().map(|(n, w)| format!("{n}*{w}")).collect();
        let name = format!("{}({})", opts.combination, terms.join("+"));
        let (layers, at, opts) = (
            self.base.num_hidden_layers,
            self.placement.clone(),
            opts.clone(),
        );
        let build = async move {
            let res = tokio::task::spawn_blocking(move || -> anyhow::Result<CachedAdapter> {
                let adapter = Arc::new(combine(&name, &loaded, &opts)?);
                let stack = LoraStack::new_on(vec![(adapter.clone(), 1.0)], layers, &at)?;
                Ok(CachedAdapter {
                    adapter,
                    stack: Arc::new(stack),
                    version: 0,
                })
            })
            .await;
            match res {
                Ok(Ok(c)) => Ok(Arc::new(c)),
                Ok(Err(e)) => Err(AdapterError::BadCombination(format!("{e:#}"))),
                Err(e) => Err(AdapterError::BadCombination(format!(
                    "the worker failed: {e}"
                ))),
            }
        };
        let c = self
            .cache
            .try_get_with(key.clone(), build)
            .await
            .map_err(|e| match e.as_ref() {
                AdapterError::BadCombination(m) => AdapterError::BadCombination(m.clone()),
                other => AdapterError::BadCombination(other.to_string()),
            })?;
        self.remember(key, &Some(c.clone()));
        self.cache.run_pending_tasks().await;
        self.metrics.bytes.set(self.cache.weighted_size() as i64);
        Ok(c)
    }

    async fn summary(&self, name: &str) -> Option<AdapterSummary> {
        let rec = self
            .records
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()?;
        let loaded = self
            .cache
            .contains_key(&CacheKey::Adapter(name.to_string(), rec.version));
        let (rank, alpha, targets, bytes) = match rec.info {
            Some((r, a, t, b)) => (Some(r), Some(a), Some(t), Some(b)),
            None => (None, None, None, None),
        };
        Some(AdapterSummary {
            name: name.to_string(),
            path: rec.path,
            version: rec.version,
            state: if loaded { "loaded" } else { "on-disk" },
            rank,
            alpha,
            targets,
            bytes,
            requests: rec.requests,
            last_used: rec.last_used,
        })
    }

    /// Bytes the cached adapters hold on the base's device: their stacks' copies on a GPU, their
    /// host tensors on the CPU.
    pub fn bytes_on_device(&self) -> usize {
        self.cache
            .iter()
            .map(|(_, c)| match c.stack.on_cpu() {
                true => c.adapter.bytes(),
                false => c.device_bytes(),
            })
            .sum()
    }

    /// Every registered adapter, by name.
    pub async fn list(&self) -> Vec<AdapterSummary> {
        self.cache.run_pending_tasks().await;
        self.metrics.bytes.set(self.cache.weighted_size() as i64);
        let names: Vec<String> = self
            .records
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        let mut out = Vec::with_capacity(names.len());
        for n in names {
            if let Some(s) = self.summary(&n).await {
                out.push(s);
            }
        }
        out
    }
}
