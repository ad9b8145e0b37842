//! A set of port numbers as a 65,536-bit bitmap: constant-time updates, and the first free port of a range
//! found by scanning 64 ports per step, so allocation stays fast however many ports are taken.

/// Which ports are taken.
#[derive(Clone)]
pub struct PortSet {
    words: Box<[u64; 1024]>,
}

impl std::fmt::Debug for PortSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PortSet({} taken)",
            self.words.iter().map(|w| w.count_ones()).sum::<u32>()
        )
    }
}

impl Default for PortSet {
    fn default() -> Self {
        PortSet {
            words: Box::new([0; 1024]),
        }
    }
}

impl PartialEq for PortSet {
    fn eq(&self, other: &PortSet) -> bool {
        self.words[..] == other.words[..]
    }
}

impl PortSet {
    /// Empties the set.
    pub fn clear(&mut self) {
        self.words.fill(0);
    }

    /// Adds every port of `other`.
    pub fn add_all(&mut self, other: &PortSet) {
        for (word, theirs) in self.words.iter_mut().zip(other.words.iter()) {
            *word |= theirs;
        }
    }

    /// How many ports are in the set.
    pub fn len(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    pub fn set(&mut self, port: u16, taken: bool) {
        let (word, bit) = (usize::from(port) / 64, port % 64);
        if taken {
            self.words[word] |= 1 << bit;
        } else {
            self.words[word] &= !(1 << bit);
        }
    }

    pub fn contains(&self, port: u16) -> bool {
        self.words[usize::from(port) / 64] & (1 << (port % 64)) != 0
    }

    /// The lowest port in `start..=end` not in the set.
    pub fn first_free(&self, start: u16, end: u16) -> Option<u16> {
        let mut port = u32::from(start);
        let end = u32::from(end);
        while port <= end {
            let word = self.words[(port / 64) as usize] | ((1u64 << (port % 64)) - 1);
            if word != u64::MAX {
                let free = (port / 64) * 64 + word.trailing_ones();
                return (free <= end).then_some(free as u16);
            }
            port = (port / 64 + 1) * 64;
        }
        None
    }

    /// The lowest port in `start..=end` in neither this set nor `other`.
    pub fn first_free_of_both(&self, other: &PortSet, start: u16, end: u16) -> Option<u16> {
        let mut port = u32::from(start);
        let end = u32::from(end);
        while port <= end {
            let index = (port / 64) as usize;
            let word = self.words[index] | other.words[index] | ((1u64 << (port % 64)) - 1);
            if word != u64::MAX {
                let free = (port / 64) * 64 + word.trailing_ones();
                return (free <= end).then_some(free as u16);
            }
            port = (port / 64 + 1) * 64;
        }
        None
    }

    /// Ports in `start..=end` in neither this set nor `other`, lowest first.
    pub fn free_of_both<'a>(
        &'a self,
        other: &'a PortSet,
        start: u16,
        end: u16,
    ) -> impl Iterator<Item = u16> + 'a {
        let mut next = Some(start);
        std::iter::from_fn(move || {
            let from = next?;
            let found = self.first_free_of_both(other, from, end)?;
            next = found.checked_add(1).filter(|n| *n <= end);
            Some(found)
        })
    }

    /// Ports in `start..=end` not in the set, lowest first.
    pub fn free_in(&self, start: u16, end: u16) -> impl Iterator<Item = u16> + '_ {
        let mut next = Some(start);
        std::iter::from_fn(move || {
            let from = next?;
            let found = self.first_free(from, end)?;
            next = found.checked_add(1).filter(|n| *n <= end);
            Some(found)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_of_both_skips_what_either_set_holds() {
        let (mut a, mut b) = (PortSet::default(), PortSet::default());
        for p in 0..100 {
            a.set(p, true);
        }
        for p in 100..300 {
            b.set(p, true);
        }
        a.set(301, true);
        assert_eq!(a.first_free_of_both(&b, 0, 1000), Some(300));
        let both: Vec<u16> = a.free_of_both(&b, 250, 304).collect();
        assert_eq!(both, [300, 302, 303, 304]);
        assert_eq!(a.first_free_of_both(&b, 0, 299), None);
        assert_eq!(a.free_of_both(&b, 65_535, 65_535).count(), 1);
    }

    #[test]
    fn finds_the_first_free_port_across_words_and_at_the_edges() {
        let mut s = PortSet::default();
        assert_eq!(s.first_free(0, 10), Some(0));
        for p in 60..=130 {
            s.set(p, true);
        }
        assert_eq!(s.first_free(60, 200), Some(131));
        assert_eq!(s.first_free(60, 130), None);
        assert_eq!(s.first_free(59, 70), Some(59));
        s.set(100, false);
        assert_eq!(s.first_free(60, 200), Some(100));
        s.set(65535, true);
        assert_eq!(s.first_free(65535, 65535), None);
        assert_eq!(s.first_free(65534, 65535), Some(65534));
        assert!(s.contains(65535) && !s.contains(65534));
        assert_eq!(
            s.free_in(58, 132).collect::<Vec<_>>(),
            vec![58, 59, 100, 131, 132]
        );
        assert_eq!(s.free_in(65535, 65535).count(), 0);
    }
}
