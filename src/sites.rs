//! The live set of sites. Reload replaces entries; handlers look a site up when they need it,
//! so a changed key or auth URL applies to the next request or connection, and the sockets of
//! unchanged sites never notice.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use crate::config::SiteConfig;

/// Shared handle to the sites, by name. A std `RwLock`: every use is one map operation.
#[derive(Clone, Default)]
pub struct Sites(Arc<RwLock<BTreeMap<String, Arc<SiteConfig>>>>);

impl Sites {
    /// The sites of a configuration.
    pub fn new(sites: impl IntoIterator<Item = SiteConfig>) -> Self {
        let map = sites.into_iter().map(|s| (s.name.clone(), Arc::new(s))).collect();
        Self(Arc::new(RwLock::new(map)))
    }

    /// One site, if configured.
    pub fn get(&self, name: &str) -> Option<Arc<SiteConfig>> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).get(name).cloned()
    }

    /// Every site, by name.
    pub fn all(&self) -> Vec<Arc<SiteConfig>> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }

    /// Adds or replaces a site.
    pub fn set(&self, site: SiteConfig) {
        self.0.write().unwrap_or_else(|p| p.into_inner()).insert(site.name.clone(), Arc::new(site));
    }

    /// Removes a site.
    pub fn remove(&self, name: &str) {
        self.0.write().unwrap_or_else(|p| p.into_inner()).remove(name);
    }
}
