//! Bookkeeping of the paged KV cache: fixed-size blocks handed out from a free list, and
//! per-sequence block tables mapping positions to physical slots. The physical cache itself
//! lives in the backend (the worker backend's `KvCache`).

use crate::error::{Error, Result};

/// Free list of physical cache blocks.
#[derive(Debug, Clone)]
pub struct BlockAllocator {
    block_size: usize,
    num_blocks: usize,
    free: Vec<u32>,
}

impl BlockAllocator {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        // Pop from the end: lowest block ids are handed out first.
        BlockAllocator { block_size, num_blocks, free: (0..num_blocks as u32).rev().collect() }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Blocks needed to hold `tokens` positions.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Grows `table` so it holds `tokens` positions; all or nothing.
    pub fn reserve(&mut self, table: &mut Vec<u32>, tokens: usize) -> Result<()> {
        let needed = self.blocks_for(tokens).saturating_sub(table.len());
        if needed > self.free.len() {
            return Err(Error::OutOfBlocks { needed, free: self.free.len() });
        }
        let at = self.free.len() - needed;
        table.extend(self.free.drain(at..).rev());
        Ok(())
    }

    /// Returns a finished sequence's blocks.
    pub fn release(&mut self, table: &mut Vec<u32>) {
        self.free.extend(table.drain(..).rev());
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
        let mut a = BlockAllocator::new(4, 16);
        let mut t1 = Vec::new();
        a.reserve(&mut t1, 17).unwrap();
        assert_eq!(t1, vec![0, 1]);
        a.reserve(&mut t1, 32).unwrap();
        assert_eq!(t1.len(), 2, "already large enough");
        let mut t2 = Vec::new();
        assert!(matches!(a.reserve(&mut t2, 48), Err(Error::OutOfBlocks { needed: 3, free: 2 })));
        assert!(t2.is_empty());
        assert_eq!(a.num_free(), 2);
        a.release(&mut t1);
        assert!(t1.is_empty());
        assert_eq!(a.num_free(), 4);
        a.reserve(&mut t2, 48).unwrap();
        assert_eq!(t2.len(), 3);
        assert_eq!(slot(&t2, 16, 33), t2[2] * 16 + 1);
    }
}
