//! The stand-in API server's storage: current objects, an append-only change log with one
//! monotonically increasing resourceVersion per change (etcd's revision), a compaction
//! horizon, and field/label selectors with the real API server's semantics.

use super::objects::{Fields, NAMESPACE_FIELDS, POD_FIELDS};
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::Arc;

/// The resources the stand-in serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Pod,
    Namespace,
}

impl Kind {
    pub(crate) fn list_kind(self) -> &'static str {
        match self {
            Kind::Pod => "PodList",
            Kind::Namespace => "NamespaceList",
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::Pod => "Pod",
            Kind::Namespace => "Namespace",
        }
    }

    pub(crate) fn fields(self) -> &'static [&'static str] {
        match self {
            Kind::Pod => POD_FIELDS,
            Kind::Namespace => NAMESPACE_FIELDS,
        }
    }
}

/// `(kind, namespace, name)`; namespaces have an empty namespace.
pub type Key = (Kind, String, String);

/// A watch event type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One committed change.
#[derive(Debug, Clone)]
pub struct Record {
    pub rv: u64,
    pub kind: Kind,
    pub event: EventType,
    pub key: Key,
    /// The object after the change (for a delete: its last state), with `kind` and
    /// `apiVersion`, as a watch event carries it.
    pub json: Arc<str>,
    /// The same object without `kind`/`apiVersion`, as list items are served.
    pub(crate) item: Arc<str>,
    pub(crate) fields: Fields,
    /// The selectable fields before the change (updates and deletes).
    pub(crate) prev: Option<Fields>,
}

#[derive(Debug, Clone)]
struct Current {
    item: Arc<str>,
    value: Value,
    fields: Fields,
}

#[derive(Debug, Default)]
pub(crate) struct World {
    /// The last committed resourceVersion.
    pub(crate) rv: u64,
    objects: BTreeMap<Key, Current>,
    /// Every change since start, in resourceVersion order.
    pub(crate) log: Vec<Record>,
    /// Versions at or below this are compacted: a watch from them gets 410 Expired.
    pub(crate) compacted: u64,
    uid_seq: u64,
}

impl World {
    pub(crate) fn new_uid(&mut self) -> String {
        self.uid_seq += 1;
        format!("00000000-0000-4000-8000-{:012x}", self.uid_seq)
    }

    pub(crate) fn get(&self, key: &Key) -> Option<&Value> {
        self.objects.get(key).map(|c| &c.value)
    }

    /// Stores `obj` (or deletes `key` when `None`) as the next resourceVersion.
    pub(crate) fn commit(&mut self, key: Key, obj: Option<Value>) -> Option<u64> {
        let prev = self.objects.get(&key).cloned();
        let (event, mut value) = match (obj, &prev) {
            (Some(v), None) => (EventType::Added, v),
            (Some(v), Some(_)) => (EventType::Modified, v),
            (None, Some(p)) => (EventType::Deleted, p.value.clone()),
            (None, None) => return None,
        };
        self.rv += 1;
        let rv = self.rv;
        value["metadata"]["resourceVersion"] = Value::String(rv.to_string());
        let fields = Fields::of(&value, key.0.fields());
        let json: Arc<str> = Arc::from(value.to_string());
        let item = Arc::from(list_item(&value).to_string());
        if event == EventType::Deleted {
            self.objects.remove(&key);
        } else {
            self.objects.insert(
                key.clone(),
                Current {
                    item: Arc::clone(&item),
                    value,
                    fields: fields.clone(),
                },
            );
        }
        self.log.push(Record {
            rv,
            kind: key.0,
            event,
            key,
            json,
            item,
            fields,
            prev: prev.map(|p| p.fields),
        });
        Some(rv)
    }

    /// List items of `kind` matching `sel` as of resourceVersion `at` (≤ the current one).
    pub(crate) fn list_at(&self, kind: Kind, at: u64, sel: &Selector) -> Vec<Arc<str>> {
        if at >= self.rv {
            return self
                .objects
                .iter()
                .filter(|(k, c)| k.0 == kind && sel.matches(&c.fields))
                .map(|(_, c)| Arc::clone(&c.item))
                .collect();
        }
        let mut state: BTreeMap<&Key, &Record> = BTreeMap::new();
        for r in self.log.iter().take_while(|r| r.rv <= at) {
            if r.kind != kind {
                continue;
            }
            if r.event == EventType::Deleted {
                state.remove(&r.key);
            } else {
                state.insert(&r.key, r);
            }
        }
        state
            .values()
            .filter(|r| sel.matches(&r.fields))
            .map(|r| Arc::clone(&r.item))
            .collect()
    }

    /// Current objects of `kind` matching `sel`, as watch events carry them (for the
    /// synthetic ADDED events of a watch from "" or "0").
    pub(crate) fn current_events(&self, kind: Kind, sel: &Selector) -> Vec<(u64, Arc<str>)> {
        self.objects
            .iter()
            .filter(|(k, c)| k.0 == kind && sel.matches(&c.fields))
            .map(|(_, c)| {
                let rv = c.value["metadata"]["resourceVersion"]
                    .as_str()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                (rv, Arc::from(c.value.to_string()))
            })
            .collect()
    }

    /// Index of the first record after resourceVersion `rv`.
    pub(crate) fn position_after(&self, rv: u64) -> usize {
        self.log.partition_point(|r| r.rv <= rv)
    }
}

/// The object without `kind` and `apiVersion` (how list items are serialised).
fn list_item(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("kind");
        m.remove("apiVersion");
    }
    v
}

/// What a watcher sees of a record, given its selector: the event type after
/// selector transitions (an update into the selection is ADDED, out of it DELETED).
pub(crate) fn visible(r: &Record, kind: Kind, sel: &Selector) -> Option<EventType> {
    if r.kind != kind {
        return None;
    }
    let now = sel.matches(&r.fields);
    let before = r.prev.as_ref().is_some_and(|p| sel.matches(p));
    match r.event {
        EventType::Added => now.then_some(EventType::Added),
        EventType::Deleted => before.then_some(EventType::Deleted),
        EventType::Modified => match (before, now) {
            (true, true) => Some(EventType::Modified),
            (false, true) => Some(EventType::Added),
            (true, false) => Some(EventType::Deleted),
            (false, false) => None,
        },
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Eq,
    NotEq,
    Exists,
    NotExists,
}

/// A parsed `fieldSelector` + `labelSelector` (+ the namespace of a namespaced path).
#[derive(Debug, Clone, Default)]
pub struct Selector {
    fields: Vec<(String, Op, String)>,
    labels: Vec<(String, Op, String)>,
}

/// A selector the real API server would refuse (400), worded as it words them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SelectorError {
    Invalid(String),
    FieldNotSupported(String),
    Requirement(String),
}

impl std::fmt::Display for SelectorError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SelectorError::Invalid(term) => {
                write!(f, "invalid selector: '{term}'; can't understand '{term}'")
            }
            SelectorError::FieldNotSupported(k) => write!(f, "field label not supported: {k}"),
            SelectorError::Requirement(term) => write!(f, "unable to parse requirement: {term}"),
        }
    }
}

impl Selector {
    /// Parses the selectors; an unsupported field label is an error, as on the real server.
    pub(crate) fn parse(
        kind: Kind,
        field: Option<&str>,
        label: Option<&str>,
        namespace: Option<&str>,
    ) -> Result<Selector, SelectorError> {
        let mut sel = Selector::default();
        for term in field.unwrap_or("").split(',').filter(|t| !t.is_empty()) {
            let (k, op, v) = if let Some((k, v)) = term.split_once("!=") {
                (k, Op::NotEq, v)
            } else if let Some((k, v)) = term.split_once("==") {
                (k, Op::Eq, v)
            } else if let Some((k, v)) = term.split_once('=') {
                (k, Op::Eq, v)
            } else {
                return Err(SelectorError::Invalid(term.to_owned()));
            };
            let k = k.trim();
            if !kind.fields().contains(&k) {
                return Err(SelectorError::FieldNotSupported(k.to_owned()));
            }
            sel.fields.push((k.to_owned(), op, v.trim().to_owned()));
        }
        if let Some(ns) = namespace {
            sel.fields
                .push(("metadata.namespace".into(), Op::Eq, ns.to_owned()));
        }
        for term in label
            .unwrap_or("")
            .split(',')
            .filter(|t| !t.trim().is_empty())
        {
            let term = term.trim();
            let req = if let Some((k, v)) = term.split_once("!=") {
                (k.to_owned(), Op::NotEq, v.to_owned())
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                (k.to_owned(), Op::Eq, v.to_owned())
            } else if term.contains(' ') || term.contains('(') {
                return Err(SelectorError::Requirement(term.to_owned()));
            } else if let Some(k) = term.strip_prefix('!') {
                (k.to_owned(), Op::NotExists, String::new())
            } else {
                (term.to_owned(), Op::Exists, String::new())
            };
            sel.labels.push(req);
        }
        Ok(sel)
    }

    pub(crate) fn matches(&self, f: &Fields) -> bool {
        self.fields.iter().all(|(k, op, v)| {
            let have = f.fields.get(k.as_str()).map_or("", String::as_str);
            match op {
                Op::Eq => have == v,
                Op::NotEq => have != v,
                Op::Exists | Op::NotExists => true,
            }
        }) && self.labels.iter().all(|(k, op, v)| {
            let have = f.labels.get(k);
            match op {
                Op::Eq => have.is_some_and(|h| h == v),
                Op::NotEq => have.is_none_or(|h| h != v),
                Op::Exists => have.is_some(),
                Op::NotExists => have.is_none(),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::objects::PodBuilder;
    use super::*;

    fn key(name: &str) -> Key {
        (Kind::Pod, "ns".into(), name.into())
    }

    fn pod(name: &str, node: &str) -> Value {
        PodBuilder::running("ns", name, node, "10.0.0.1")
            .label("app", name)
            .to_json(name, 0)
    }

    #[test]
    fn versions_increase_and_lists_can_be_served_at_an_older_version() {
        let mut w = World::default();
        let all = Selector::default();
        assert_eq!(w.commit(key("a"), Some(pod("a", "n1"))), Some(1));
        assert_eq!(w.commit(key("b"), Some(pod("b", "n1"))), Some(2));
        assert_eq!(w.commit(key("a"), None), Some(3));
        assert_eq!(
            w.commit(key("a"), None),
            None,
            "deleting twice is not a change"
        );
        assert_eq!(w.list_at(Kind::Pod, 3, &all).len(), 1);
        assert_eq!(w.list_at(Kind::Pod, 2, &all).len(), 2);
        assert_eq!(w.list_at(Kind::Pod, 1, &all).len(), 1);
        assert_eq!(w.list_at(Kind::Namespace, 3, &all).len(), 0);
        assert_eq!(w.position_after(1), 1);
        let item: Value = serde_json::from_str(&w.list_at(Kind::Pod, 3, &all)[0]).unwrap();
        assert_eq!(item["metadata"]["resourceVersion"], "2");
        assert!(item.get("kind").is_none(), "list items carry no kind");
        let ev: Value = serde_json::from_str(&w.log[2].json).unwrap();
        assert_eq!(
            (ev["kind"].as_str(), w.log[2].event),
            (Some("Pod"), EventType::Deleted)
        );
        assert_eq!(ev["metadata"]["resourceVersion"], "3");
    }

    #[test]
    fn field_selector_transitions_become_added_and_deleted() {
        let mut w = World::default();
        let sel = Selector::parse(Kind::Pod, Some("spec.nodeName=n1"), None, None).unwrap();
        w.commit(key("a"), Some(PodBuilder::new("ns", "a").to_json("a", 0)));
        w.commit(key("a"), Some(pod("a", "n1")));
        w.commit(key("a"), Some(pod("a", "n1")));
        w.commit(key("a"), Some(pod("a", "n2")));
        w.commit(key("a"), None);
        let seen: Vec<_> = w.log.iter().map(|r| visible(r, Kind::Pod, &sel)).collect();
        assert_eq!(
            seen,
            [
                None,
                Some(EventType::Added),
                Some(EventType::Modified),
                Some(EventType::Deleted),
                None
            ]
        );
    }

    #[test]
    fn selectors_parse_like_the_real_server() {
        let p = Fields::of(&pod("a", "n1"), POD_FIELDS);
        let ok = |f: Option<&str>, l: Option<&str>| {
            Selector::parse(Kind::Pod, f, l, None).unwrap().matches(&p)
        };
        assert!(ok(Some("spec.nodeName=n1"), None));
        assert!(ok(Some("spec.nodeName==n1,status.phase=Running"), None));
        assert!(!ok(Some("spec.nodeName!=n1"), None));
        assert!(ok(None, Some("app=a")));
        assert!(ok(None, Some("app,!missing")));
        assert!(!ok(None, Some("app!=a")));
        assert!(
            Selector::parse(Kind::Pod, Some("spec.bogus=x"), None, None)
                .unwrap_err()
                .to_string()
                .contains("field label not supported: spec.bogus")
        );
        assert!(Selector::parse(Kind::Namespace, Some("spec.nodeName=x"), None, None).is_err());
        let scoped = Selector::parse(Kind::Pod, None, None, Some("other")).unwrap();
        assert!(!scoped.matches(&p));
    }
}
