//! Bookkeeping of the paged KV cache: fixed-size blocks, per-sequence block tables mapping
//! positions to physical slots, and the prefix cache over them. The physical cache itself
//! lives in the backend (the worker backend's `KvCache`).
//!
//! Prefix caching (vLLM's automatic prefix caching, in the coordinator's accounting): a full
//! block is named by a chained hash of its tokens ([`PrefixHasher`]: SHA-256 of the previous
//! block's hash and this block's token ids, rooted in the model's identity and an optional
//! per-request salt), so equal hashes mean equal contents. A computed full block is
//! registered under its hash; a sequence whose context starts with cached blocks takes them
//! (reference-counted, read-only: a sequence only writes past its shared blocks) and skips
//! their prefill. A block nobody references keeps its contents and its hash until its memory
//! is needed: then the least recently released goes first.

use std::collections::{BTreeMap, HashMap};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// The name of a full block's contents: its tokens and everything before them.
pub type BlockHash = [u8; 32];

/// Hashes full blocks of tokens into chains of [`BlockHash`]es.
#[derive(Debug, Clone)]
pub struct PrefixHasher {
    seed: BlockHash,
    block_size: usize,
}

impl PrefixHasher {
    /// Hashes for a cache whose contents `identity` determines (the model, and how its weights
    /// are kept: anything that changes a block's keys and values).
    pub fn new(identity: &str, block_size: usize) -> Self {
        PrefixHasher { seed: Sha256::digest(identity.as_bytes()).into(), block_size }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// The hash chain's root for requests with `salt` (requests with different salts share
    /// nothing).
    pub fn root(&self, salt: Option<&str>) -> BlockHash {
        let mut h = Sha256::new();
        h.update(self.seed);
        if let Some(salt) = salt {
            h.update([1]);
            h.update(salt.as_bytes());
        }
        h.finalize().into()
    }

    /// Extends `hashes` (a chain from `root`) with the full blocks of `tokens`, the tokens
    /// that follow its last block.
    pub fn extend(&self, root: &BlockHash, hashes: &mut Vec<BlockHash>, tokens: &[u32]) {
        for block in tokens.chunks_exact(self.block_size) {
            let mut h = Sha256::new();
            h.update(hashes.last().unwrap_or(root));
            for t in block {
                h.update(t.to_le_bytes());
            }
            hashes.push(h.finalize().into());
        }
    }

    /// The hashes of every full block of `tokens`.
    pub fn hashes(&self, salt: Option<&str>, tokens: &[u32]) -> Vec<BlockHash> {
        let mut hashes = Vec::with_capacity(tokens.len() / self.block_size);
        self.extend(&self.root(salt), &mut hashes, tokens);
        hashes
    }
}

/// A change to the set of cached blocks (what a router needs to know where prefixes live).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheEvent {
    Stored(BlockHash),
    Evicted(BlockHash),
}

/// The physical blocks of one replica's KV cache: free, in use (reference-counted), or cached
/// and unreferenced (evictable, least recently released first).
#[derive(Debug, Clone)]
pub struct BlockPool {
    block_size: usize,
    /// Blocks holding nothing reusable.
    free: Vec<u32>,
    refs: Vec<u32>,
    /// The hash a block is cached under.
    hash_of: Vec<Option<BlockHash>>,
    cached: HashMap<BlockHash, u32>,
    /// Cached blocks no sequence references, by release tick.
    evictable: BTreeMap<u64, u32>,
    released_at: Vec<u64>,
    tick: u64,
    caching: bool,
    events: Vec<CacheEvent>,
}

impl BlockPool {
    /// A pool of `num_blocks` blocks; with `caching` false no block is ever reused.
    pub fn new(num_blocks: usize, block_size: usize, caching: bool) -> Self {
        BlockPool {
            block_size,
            // Pop from the end: lowest block ids are handed out first.
            free: (0..num_blocks as u32).rev().collect(),
            refs: vec![0; num_blocks],
            hash_of: vec![None; num_blocks],
            cached: HashMap::new(),
            evictable: BTreeMap::new(),
            released_at: vec![0; num_blocks],
            tick: 0,
            caching,
            events: Vec::new(),
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.refs.len()
    }

    /// Blocks a sequence can get: free ones and cached ones nobody references.
    pub fn num_available(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    /// Blocks some sequence references.
    pub fn num_used(&self) -> usize {
        self.num_blocks() - self.num_available()
    }

    /// Blocks cached under a hash (referenced or not).
    pub fn num_cached(&self) -> usize {
        self.cached.len()
    }

    /// Blocks needed to hold `tokens` positions.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// How many of `hashes`' leading blocks are cached.
    pub fn cached_prefix(&self, hashes: &[BlockHash]) -> usize {
        hashes.iter().take_while(|h| self.cached.contains_key(*h)).count()
    }

    /// Takes a reference to the cached blocks of `hashes` (all of them must be cached, see
    /// [`BlockPool::cached_prefix`]) and appends them to `table`.
    pub fn share(&mut self, table: &mut Vec<u32>, hashes: &[BlockHash]) {
        for h in hashes {
            let b = self.cached[h];
            if self.refs[b as usize] == 0 {
                self.evictable.remove(&self.released_at[b as usize]);
            }
            self.refs[b as usize] += 1;
            table.push(b);
        }
    }

    /// Grows `table` so it holds `tokens` positions; all or nothing. Free blocks go first,
    /// then the least recently released cached ones (forgetting their contents).
    pub fn reserve(&mut self, table: &mut Vec<u32>, tokens: usize) -> Result<()> {
        let needed = self.blocks_for(tokens).saturating_sub(table.len());
        if needed > self.num_available() {
            return Err(Error::OutOfBlocks { needed, free: self.num_available() });
        }
        for _ in 0..needed {
            let b = self.free.pop().or_else(|| self.evict_oldest()).expect("counted as available");
            self.refs[b as usize] = 1;
            table.push(b);
        }
        Ok(())
    }

    /// Registers a computed full block under its hash. A block whose contents are already
    /// cached elsewhere stays private (and is freed as usual).
    pub fn register(&mut self, block: u32, hash: BlockHash) {
        if !self.caching || self.hash_of[block as usize].is_some() || self.cached.contains_key(&hash) {
            return;
        }
        self.hash_of[block as usize] = Some(hash);
        self.cached.insert(hash, block);
        self.events.push(CacheEvent::Stored(hash));
    }

    /// Drops a sequence's references. Its last blocks are released first, so they are evicted
    /// before the prefix blocks other sequences are likelier to share.
    pub fn release(&mut self, table: &mut Vec<u32>) {
        for b in table.drain(..).rev() {
            let r = &mut self.refs[b as usize];
            *r -= 1;
            if *r > 0 {
                continue;
            }
            if self.hash_of[b as usize].is_some() {
                self.tick += 1;
                self.released_at[b as usize] = self.tick;
                self.evictable.insert(self.tick, b);
            } else {
                self.free.push(b);
            }
        }
    }

    /// Forgets the contents of every cached block no sequence references: they become free.
    pub fn forget_cached(&mut self) {
        while let Some(b) = self.evict_oldest() {
            self.free.push(b);
        }
    }

    /// The least recently released cached block nobody references, its contents forgotten.
    fn evict_oldest(&mut self) -> Option<u32> {
        let (_, b) = self.evictable.pop_first()?;
        let h = self.hash_of[b as usize].take().expect("evictable blocks are cached");
        self.cached.remove(&h);
        self.events.push(CacheEvent::Evicted(h));
        Some(b)
    }

    /// The changes to the cached set since the last call.
    pub fn take_events(&mut self) -> Vec<CacheEvent> {
        std::mem::take(&mut self.events)
    }
}

/// Physical slot of `position` under a block table.
pub fn slot(table: &[u32], block_size: usize, position: usize) -> u32 {
    table[position / block_size] * block_size as u32 + (position % block_size) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_is_all_or_nothing_and_release_returns_blocks() {
        let mut a = BlockPool::new(4, 16, true);
        let mut t1 = Vec::new();
        a.reserve(&mut t1, 17).unwrap();
        assert_eq!(t1, vec![0, 1]);
        a.reserve(&mut t1, 32).unwrap();
        assert_eq!(t1.len(), 2, "already large enough");
        let mut t2 = Vec::new();
        assert!(matches!(a.reserve(&mut t2, 48), Err(Error::OutOfBlocks { needed: 3, free: 2 })));
        assert!(t2.is_empty());
        assert_eq!(a.num_available(), 2);
        a.release(&mut t1);
        assert!(t1.is_empty());
        assert_eq!(a.num_available(), 4);
        a.reserve(&mut t2, 48).unwrap();
        assert_eq!(t2.len(), 3);
        assert_eq!(slot(&t2, 16, 33), t2[2] * 16 + 1);
    }

    #[test]
    fn hashes_chain_blocks_and_depend_on_salt_and_identity() {
        let h = PrefixHasher::new("model", 4);
        let a = h.hashes(None, &[1, 2, 3, 4, 5, 6, 7, 8, 9]);
        assert_eq!(a.len(), 2, "only full blocks");
        let b = h.hashes(None, &[1, 2, 3, 4, 5, 6, 7, 0]);
        assert_eq!(a[0], b[0]);
        assert_ne!(a[1], b[1]);
        let c = h.hashes(None, &[0, 2, 3, 4, 5, 6, 7, 8]);
        assert_ne!(a[1], c[1], "a block's hash depends on every block before it");
        assert_ne!(a[0], h.hashes(Some("tenant"), &[1, 2, 3, 4])[0]);
        assert_ne!(a[0], PrefixHasher::new("other model", 4).hashes(None, &[1, 2, 3, 4])[0]);
        let mut grown = a[..1].to_vec();
        h.extend(&h.root(None), &mut grown, &[5, 6, 7, 8, 9]);
        assert_eq!(grown, a);
    }

    #[test]
    fn cached_blocks_are_shared_kept_and_evicted_least_recently_released_first() {
        let h = PrefixHasher::new("m", 2);
        let mut pool = BlockPool::new(4, 2, true);
        let tokens = [1, 2, 3, 4];
        let hashes = h.hashes(None, &tokens);
        let mut a = Vec::new();
        pool.reserve(&mut a, 4).unwrap();
        pool.register(a[0], hashes[0]);
        pool.register(a[1], hashes[1]);
        assert_eq!(pool.take_events(), vec![CacheEvent::Stored(hashes[0]), CacheEvent::Stored(hashes[1])]);
        // A second sequence shares both blocks.
        let mut b = Vec::new();
        assert_eq!(pool.cached_prefix(&hashes), 2);
        pool.share(&mut b, &hashes);
        assert_eq!(a, b);
        assert_eq!(pool.num_used(), 2);
        pool.release(&mut a);
        assert_eq!(pool.num_used(), 2, "still referenced");
        pool.release(&mut b);
        assert_eq!((pool.num_used(), pool.num_available(), pool.num_cached()), (0, 4, 2));
        // Free blocks go before cached ones, then the last block released (the tail) first.
        let mut c = Vec::new();
        pool.reserve(&mut c, 6).unwrap();
        assert_eq!(pool.take_events(), vec![CacheEvent::Evicted(hashes[1])]);
        assert_eq!(pool.cached_prefix(&hashes), 1);
        pool.release(&mut c);
        assert_eq!(pool.num_used(), 0);
    }

    #[test]
    fn forgetting_the_cache_frees_unreferenced_blocks_and_keeps_referenced_ones() {
        let h = PrefixHasher::new("m", 2);
        let hashes = h.hashes(None, &[1, 2, 3, 4]);
        let mut pool = BlockPool::new(4, 2, true);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        pool.reserve(&mut a, 2).unwrap();
        pool.reserve(&mut b, 2).unwrap();
        pool.register(a[0], hashes[0]);
        pool.register(b[0], hashes[1]);
        pool.release(&mut a);
        pool.take_events();
        pool.forget_cached();
        assert_eq!(pool.take_events(), vec![CacheEvent::Evicted(hashes[0])]);
        assert_eq!((pool.cached_prefix(&hashes), pool.num_cached(), pool.num_available()), (0, 1, 3));
        pool.release(&mut b);
        assert_eq!(pool.num_used(), 0);
    }

    #[test]
    fn without_caching_nothing_is_registered() {
        let h = PrefixHasher::new("m", 2);
        let mut pool = BlockPool::new(2, 2, false);
        let mut a = Vec::new();
        pool.reserve(&mut a, 2).unwrap();
        pool.register(a[0], h.hashes(None, &[1, 2])[0]);
        assert_eq!(pool.cached_prefix(&h.hashes(None, &[1, 2])), 0);
        assert!(pool.take_events().is_empty());
    }
}
