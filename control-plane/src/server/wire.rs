//! Responses as they go on the wire, written by hand so that a push shares
//! the cache's bytes instead of copying them. A gRPC message is a 5-byte
//! prefix (compression flag, big-endian length) and the protobuf message;
//! protobuf lets a message's fields come in any order and split across
//! buffers, so a response is a list of chunks: one small buffer per response
//! with the prefix and the stream's own fields (version, type URL, nonce,
//! per-resource names in Delta), and the shared encoded resources between
//! them ([`Encoded::sotw_entry`], [`Encoded::any_bytes`]) — reference counts,
//! not copies. Nothing here grows per stream.

use std::ops::Range;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};

use crate::cache::Encoded;
use crate::resources::ResourceType;

/// One response of a stream, before encoding: what the state machines decide.
#[derive(Debug, Clone)]
pub struct Reply {
    pub ty: ResourceType,
    /// SotW `version_info`; Delta `system_version_info`.
    pub version: Arc<str>,
    pub nonce: u64,
    pub resources: Vec<Arc<Encoded>>,
    /// Delta `removed_resources`.
    pub removed: Vec<String>,
}

/// One encoded gRPC message, in chunks to be written in order.
#[derive(Debug, Clone, Default)]
pub struct Frame {
    pub chunks: Vec<Bytes>,
}

impl Frame {
    /// Bytes on the wire, prefix included.
    pub fn len(&self) -> usize {
        self.chunks.iter().map(Bytes::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The protobuf message without the gRPC prefix, in one buffer (tests, tools).
    pub fn message(&self) -> Vec<u8> {
        let mut all = Vec::with_capacity(self.len());
        for chunk in &self.chunks {
            all.extend_from_slice(chunk);
        }
        all.split_off(PREFIX.min(all.len()))
    }
}

const PREFIX: usize = 5;

/// Shared chunks up to this size are copied into the response's own buffer
/// instead: one DATA frame instead of several costs h2 less per stream (its
/// queue of pending frames never shrinks) than the copy of a small resource.
/// Larger resources (a big service's endpoints) are always shared.
pub const INLINE_MAX: usize = 4 * 1024;

fn inlined(len: usize) -> usize {
    if len <= INLINE_MAX { len } else { 0 }
}

/// Builds a frame: small fields go to one per-response buffer, shared chunks
/// are referenced in place; the prefix is filled in at the end.
struct Builder {
    small: BytesMut,
    /// In order: a range of `small`, or a shared chunk.
    parts: Vec<Part>,
    /// Start of the small bytes not yet in `parts`.
    open: usize,
}

enum Part {
    Small(Range<usize>),
    Shared(Bytes),
}

impl Builder {
    fn new(small_capacity: usize) -> Self {
        let mut small = BytesMut::with_capacity(PREFIX + small_capacity);
        small.put_bytes(0, PREFIX);
        Builder { small, parts: Vec::new(), open: 0 }
    }

    fn string(&mut self, tag: u32, value: &str) {
        if value.is_empty() {
            return;
        }
        encode_key(tag, WireType::LengthDelimited, &mut self.small);
        encode_varint(value.len() as u64, &mut self.small);
        self.small.put_slice(value.as_bytes());
    }

    /// Key and length of a length-delimited field whose body follows.
    fn header(&mut self, tag: u32, len: usize) {
        encode_key(tag, WireType::LengthDelimited, &mut self.small);
        encode_varint(len as u64, &mut self.small);
    }

    fn shared(&mut self, chunk: Bytes) {
        if chunk.len() <= INLINE_MAX {
            self.small.put_slice(&chunk);
            return;
        }
        if self.small.len() > self.open {
            self.parts.push(Part::Small(self.open..self.small.len()));
            self.open = self.small.len();
        }
        self.parts.push(Part::Shared(chunk));
    }

    fn finish(mut self) -> Frame {
        if self.small.len() > self.open {
            self.parts.push(Part::Small(self.open..self.small.len()));
        }
        let total: usize = self
            .parts
            .iter()
            .map(|p| match p {
                Part::Small(r) => r.len(),
                Part::Shared(b) => b.len(),
            })
            .sum::<usize>()
            - PREFIX;
        // Messages are bounded far below 4 GiB by Cloud Map's limits; saturate rather than wrap.
        let len = u32::try_from(total).unwrap_or(u32::MAX);
        self.small[1..PREFIX].copy_from_slice(&len.to_be_bytes());
        let small = self.small.freeze();
        let chunks = self
            .parts
            .into_iter()
            .map(|p| match p {
                Part::Small(r) => small.slice(r),
                Part::Shared(b) => b,
            })
            .collect();
        Frame { chunks }
    }
}

/// `n` in decimal, written into `digits` (no allocation per response).
fn decimal(mut n: u64, digits: &mut [u8; 20]) -> &str {
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    // Only ASCII digits were written.
    std::str::from_utf8(&digits[at..]).unwrap_or_default()
}

fn string_len(tag: u32, value: &str) -> usize {
    if value.is_empty() { 0 } else { key_len(tag) + encoded_len_varint(value.len() as u64) + value.len() }
}

/// `DiscoveryResponse { version_info = 1, resources = 2, type_url = 4, nonce = 5 }`.
pub fn sotw(reply: &Reply) -> Frame {
    let mut digits = [0; 20];
    let nonce = decimal(reply.nonce, &mut digits);
    let inline: usize = reply.resources.iter().map(|r| inlined(r.sotw_entry().len())).sum();
    let mut b = Builder::new(reply.version.len() + reply.ty.type_url().len() + nonce.len() + 8 + inline);
    b.string(1, &reply.version);
    b.string(4, reply.ty.type_url());
    b.string(5, nonce);
    for r in &reply.resources {
        b.shared(r.sotw_entry());
    }
    b.finish()
}

/// `DeltaDiscoveryResponse { system_version_info = 1, resources = 2, type_url = 4,
/// nonce = 5, removed_resources = 6 }`, each resource
/// `Resource { version = 1, resource = 2 (Any), name = 3 }`.
pub fn delta(reply: &Reply) -> Frame {
    let mut digits = [0; 20];
    let nonce = decimal(reply.nonce, &mut digits);
    let per_resource: usize =
        reply.resources.iter().map(|r| r.name.len() + r.version.len() + 24 + inlined(r.any_bytes().len())).sum();
    let removed: usize = reply.removed.iter().map(|n| n.len() + 4).sum();
    let mut b =
        Builder::new(reply.version.len() + reply.ty.type_url().len() + nonce.len() + per_resource + removed + 8);
    b.string(1, &reply.version);
    b.string(4, reply.ty.type_url());
    b.string(5, nonce);
    for name in &reply.removed {
        // Repeated strings are written even when empty.
        b.header(6, name.len());
        b.small.put_slice(name.as_bytes());
    }
    for r in &reply.resources {
        let any = r.any_bytes();
        let body = string_len(1, &r.version)
            + string_len(3, &r.name)
            + key_len(2)
            + encoded_len_varint(any.len() as u64)
            + any.len();
        b.header(2, body);
        b.string(1, &r.version);
        b.string(3, &r.name);
        b.header(2, any.len());
        b.shared(any);
    }
    b.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryResponse, DiscoveryResponse, Resource};
    use envoy_types::util::pack_any;
    use prost::Message;

    #[test]
    fn nonces_are_written_in_decimal() {
        for n in [0, 7, 10, 4_096, 1_000_000_007, u64::MAX] {
            assert_eq!(decimal(n, &mut [0; 20]), n.to_string());
        }
    }

    fn encoded(name: &str) -> Arc<Encoded> {
        let cluster = Cluster { name: name.into(), ..Default::default() };
        Arc::new(Encoded::new(name.into(), pack_any(cluster)))
    }

    /// A resource larger than [`INLINE_MAX`], which is shared rather than copied.
    fn large(name: &str) -> Arc<Encoded> {
        let cluster = Cluster { name: name.into(), alt_stat_name: "x".repeat(INLINE_MAX), ..Default::default() };
        Arc::new(Encoded::new(name.into(), pack_any(cluster)))
    }

    fn reply(resources: Vec<Arc<Encoded>>, removed: &[&str]) -> Reply {
        Reply {
            ty: ResourceType::Cluster,
            version: "v7".into(),
            nonce: 42,
            resources,
            removed: removed.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn sotw_frames_decode_as_the_response_prost_would_write() {
        let (a, b) = (large("a.demo"), encoded("b.demo"));
        let frame = sotw(&reply(vec![a.clone(), b.clone()], &[]));
        assert_eq!(frame.chunks[0][0], 0, "not compressed");
        let len = u32::from_be_bytes(frame.chunks[0][1..5].try_into().expect("4 bytes")) as usize;
        assert_eq!(len + 5, frame.len());
        let expected = DiscoveryResponse {
            version_info: "v7".into(),
            resources: vec![a.resource(), b.resource()],
            type_url: ResourceType::Cluster.type_url().into(),
            nonce: "42".into(),
            ..Default::default()
        };
        assert_eq!(DiscoveryResponse::decode(frame.message().as_slice()).expect("decodes"), expected);
        // A large resource is the cache's bytes, not a copy; a small one is copied
        // next to the stream's own fields.
        assert!(frame.chunks.iter().any(|c| c.as_ptr() == a.sotw_entry().as_ptr()));
        assert_eq!(frame.chunks.len(), 3, "own fields, the shared resource, the small one");
        let small = sotw(&reply(vec![encoded("c.demo")], &[]));
        assert_eq!(small.chunks.len(), 1, "small resources go in one buffer");
    }

    #[test]
    fn delta_frames_decode_as_the_response_prost_would_write() {
        let (a, b) = (large("a.demo"), encoded("b.demo"));
        let frame = delta(&reply(vec![a.clone(), b.clone()], &["gone.demo", "old.demo"]));
        let len = u32::from_be_bytes(frame.chunks[0][1..5].try_into().expect("4 bytes")) as usize;
        assert_eq!(len + 5, frame.len());
        let resource = |e: &Encoded| Resource {
            name: e.name.clone(),
            version: e.version.to_string(),
            resource: Some(e.resource()),
            ..Default::default()
        };
        let expected = DeltaDiscoveryResponse {
            system_version_info: "v7".into(),
            resources: vec![resource(&a), resource(&b)],
            type_url: ResourceType::Cluster.type_url().into(),
            nonce: "42".into(),
            removed_resources: vec!["gone.demo".into(), "old.demo".into()],
            ..Default::default()
        };
        assert_eq!(DeltaDiscoveryResponse::decode(frame.message().as_slice()).expect("decodes"), expected);
        assert!(frame.chunks.iter().any(|c| c.as_ptr() == a.any_bytes().as_ptr()));
        // Only removals: one small chunk.
        let removals = delta(&reply(Vec::new(), &["gone.demo"]));
        assert_eq!(removals.chunks.len(), 1);
        let decoded = DeltaDiscoveryResponse::decode(removals.message().as_slice()).expect("decodes");
        assert_eq!(decoded.removed_resources, vec!["gone.demo"]);
        assert!(decoded.resources.is_empty());
    }

    #[test]
    fn an_empty_sotw_response_still_names_its_type() {
        let frame = sotw(&Reply { version: "".into(), ..reply(Vec::new(), &[]) });
        let decoded = DiscoveryResponse::decode(frame.message().as_slice()).expect("decodes");
        assert_eq!(decoded.type_url, ResourceType::Cluster.type_url());
        assert!(decoded.resources.is_empty());
    }
}
