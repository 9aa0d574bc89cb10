//! Compact maps and sets keyed by resource name, for per-stream state. Most
//! streams hold one name per type (a gRPC client of one service), where a
//! `BTreeMap`'s first node costs ~550 bytes; a sorted `Vec` costs the entry.
//! Lookups are binary searches, so a proxy's wildcard set of thousands of
//! names stays fast.

use std::collections::BTreeMap;

/// Resource name → `V`, sorted by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameMap<V>(Vec<(String, V)>);

/// A set of resource names.
pub type NameSet = NameMap<()>;

impl<V> Default for NameMap<V> {
    fn default() -> Self {
        NameMap(Vec::new())
    }
}

impl<V> NameMap<V> {
    fn find(&self, name: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(n, _)| n.as_str().cmp(name))
    }

    pub fn get(&self, name: &str) -> Option<&V> {
        self.find(name).ok().map(|i| &self.0[i].1)
    }

    pub fn contains_key(&self, name: &str) -> bool {
        self.find(name).is_ok()
    }

    pub fn insert(&mut self, name: String, value: V) -> Option<V> {
        match self.find(&name) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, value)),
            Err(i) => {
                // The first few entries exactly, then the usual doubling.
                if self.0.len() < 4 && self.0.len() == self.0.capacity() {
                    self.0.reserve_exact(1);
                }
                self.0.insert(i, (name, value));
                None
            }
        }
    }

    /// Set `name` to `value`, copying the name only when it is new.
    pub fn set(&mut self, name: &str, value: V) {
        match self.find(name) {
            Ok(i) => self.0[i].1 = value,
            Err(_) => {
                self.insert(name.to_string(), value);
            }
        }
    }

    pub fn remove(&mut self, name: &str) -> Option<V> {
        let i = self.find(name).ok()?;
        let (_, value) = self.0.remove(i);
        if self.0.is_empty() {
            self.0 = Vec::new();
        }
        Some(value)
    }

    pub fn retain(&mut self, mut keep: impl FnMut(&String, &mut V) -> bool) {
        self.0.retain_mut(|(n, v)| keep(n, v));
        if self.0.is_empty() {
            self.0 = Vec::new();
        }
    }

    pub fn clear(&mut self) {
        self.0 = Vec::new();
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &V)> {
        self.0.iter().map(|(n, v)| (n, v))
    }

    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.0.iter().map(|(n, _)| n)
    }

    pub fn to_btree(&self) -> BTreeMap<String, V>
    where
        V: Clone,
    {
        self.0.iter().cloned().collect()
    }
}

impl NameSet {
    /// Add `name`; whether it was new.
    pub fn add(&mut self, name: String) -> bool {
        self.insert(name, ()).is_none()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.contains_key(name)
    }

    pub fn is_subset(&self, other: &NameSet) -> bool {
        self.keys().all(|n| other.contains(n))
    }

    /// Names in `self` and not in `other`.
    pub fn difference<'a>(&'a self, other: &'a NameSet) -> impl Iterator<Item = &'a String> {
        self.keys().filter(|n| !other.contains(n))
    }
}

impl<V> FromIterator<(String, V)> for NameMap<V> {
    fn from_iter<I: IntoIterator<Item = (String, V)>>(items: I) -> Self {
        let mut entries: Vec<(String, V)> = items.into_iter().collect();
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        // The last value of a repeated name wins, as in a map.
        entries.reverse();
        entries.dedup_by(|a, b| a.0 == b.0);
        entries.reverse();
        entries.shrink_to_fit();
        NameMap(entries)
    }
}

impl FromIterator<String> for NameSet {
    fn from_iter<I: IntoIterator<Item = String>>(names: I) -> Self {
        names.into_iter().map(|n| (n, ())).collect()
    }
}

impl<V> Extend<(String, V)> for NameMap<V> {
    fn extend<I: IntoIterator<Item = (String, V)>>(&mut self, items: I) {
        for (name, value) in items {
            self.insert(name, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn behaves_like_a_btree_map(ops in proptest::collection::vec((0u8..3, "[a-e]{1,2}", 0u32..5), 0..60)) {
            let mut ours: NameMap<u32> = NameMap::default();
            let mut model: BTreeMap<String, u32> = BTreeMap::new();
            for (op, name, value) in ops {
                match op {
                    0 => prop_assert_eq!(ours.insert(name.clone(), value), model.insert(name, value)),
                    1 => prop_assert_eq!(ours.remove(&name), model.remove(&name)),
                    _ => {
                        ours.retain(|_, v| *v != value);
                        model.retain(|_, v| *v != value);
                    }
                }
                prop_assert_eq!(ours.to_btree(), model.clone());
                prop_assert_eq!(ours.len(), model.len());
            }
        }

        #[test]
        fn collects_like_a_btree_map(items in proptest::collection::vec(("[a-d]", 0u32..9), 0..20)) {
            let ours: NameMap<u32> = items.iter().cloned().collect();
            let model: BTreeMap<String, u32> = items.into_iter().collect();
            prop_assert_eq!(ours.to_btree(), model);
        }
    }

    #[test]
    fn set_operations() {
        let a: NameSet = ["x".to_string(), "y".to_string()].into_iter().collect();
        let b: NameSet = ["y".to_string()].into_iter().collect();
        assert!(b.is_subset(&a) && !a.is_subset(&b));
        assert_eq!(a.difference(&b).collect::<Vec<_>>(), vec!["x"]);
        let mut c = NameSet::default();
        assert!(c.add("q".into()));
        assert!(!c.add("q".into()));
        assert!(c.contains("q"));
    }
}
