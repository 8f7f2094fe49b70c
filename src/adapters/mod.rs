//! Named adapters for the server: a registry of adapter folders (name → path, version, usage), a
//! bytes-capped LRU cache of loaded adapters (`moka`) and, behind it, a host tier of parsed
//! adapters (`host_tier`) so that an evicted adapter returns without reading its folder again.
//!
//! Loading happens in the request's task (off the scheduler thread); concurrent first requests for
//! one adapter load it once. A sequence holds its adapter through an `Arc`, so an adapter in use
//! is never dropped: if the cache evicts it meanwhile, the `alive` map still finds it and puts it
//! back instead of loading a second copy. Replacing an adapter gives it a new version (a new cache
//! key); running sequences keep the version they started with.

mod host_tier;
mod metrics;
mod registry;

pub use metrics::AdapterMetrics;
pub use registry::{AdapterError, AdapterRegistry, AdapterSummary, CachedAdapter};

/// Whether `name` is an acceptable adapter name: `[A-Za-z0-9._-]{1,64}`, not `.` or `..`.
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-')
}

#[cfg(test)]
mod tests {
    use super::valid_name;

    #[test]
    fn names() {
        for ok in ["legal", "med-v2", "a.b_c", "x"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", ".", "..", "../etc", "a/b", "a b", &"x".repeat(65), "é"] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
