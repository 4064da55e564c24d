//! Label statistics of a dataset (for `clip4str data show`): how long the stored labels are and which
//! characters they use, measured on the raw labels before the reference filter (SPEC §13.2). Lengths count
//! Unicode scalar values, as Python's `len(label)` does.

use std::collections::BTreeMap;

/// Length and character counts over a set of raw labels; [`LabelStats::merge`] combines partial counts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelStats {
    /// Number of labels counted.
    pub labels: u64,
    /// Number of labels of each length in characters.
    pub lengths: BTreeMap<usize, u64>,
    /// Occurrences of each character over all labels.
    pub chars: BTreeMap<char, u64>,
}

/// One row of a label-length histogram: labels of `min..=max` characters (`max: None` is open-ended).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LengthBin {
    /// Shortest length in the bin.
    pub min: usize,
    /// Longest length in the bin, or `None` for "`min` or more".
    pub max: Option<usize>,
    /// Number of labels in the bin.
    pub count: u64,
}

/// How the counted characters relate to a charset (e.g. [`crate::charset::CHARSET_94`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Coverage {
    /// Characters of the charset that occur, with their counts, in charset order.
    pub seen: Vec<(char, u64)>,
    /// Characters of the charset that never occur, in charset order.
    pub missing: Vec<char>,
    /// Characters outside the charset, with their counts, most frequent first (ties by code point).
    pub outside: Vec<(char, u64)>,
}

impl LabelStats {
    /// Counts one label.
    pub fn add(&mut self, label: &str) {
        self.labels += 1;
        let mut length = 0;
        for c in label.chars() {
            *self.chars.entry(c).or_default() += 1;
            length += 1;
        }
        *self.lengths.entry(length).or_default() += 1;
    }

    /// Adds the counts of `other` (e.g. from another thread's share of the labels).
    pub fn merge(&mut self, other: &LabelStats) {
        self.labels += other.labels;
        for (&length, &count) in &other.lengths {
            *self.lengths.entry(length).or_default() += count;
        }
        for (&c, &count) in &other.chars {
            *self.chars.entry(c).or_default() += count;
        }
    }

    /// The length histogram with one bin per length from the shortest label up to `open_from - 1`
    /// (empty lengths in between included, so bars line up), then one open-ended bin for `open_from` or
    /// more characters when any label is that long. Empty when no label was counted.
    pub fn length_histogram(&self, open_from: usize) -> Vec<LengthBin> {
        let (Some((&shortest, _)), Some((&longest, _))) = (
            self.lengths.first_key_value(),
            self.lengths.last_key_value(),
        ) else {
            return Vec::new();
        };
        let mut bins: Vec<LengthBin> = (shortest..=longest.min(open_from.saturating_sub(1)))
            .filter(|&length| length < open_from)
            .map(|length| LengthBin {
                min: length,
                max: Some(length),
                count: self.lengths.get(&length).copied().unwrap_or(0),
            })
            .collect();
        let long: u64 = self.lengths.range(open_from..).map(|(_, &n)| n).sum();
        if long > 0 {
            bins.push(LengthBin {
                min: open_from,
                max: None,
                count: long,
            });
        }
        bins
    }

    /// Which characters of `charset` occur and which never do, and which counted characters lie outside it.
    pub fn coverage(&self, charset: &str) -> Coverage {
        let mut coverage = Coverage::default();
        let mut in_charset = std::collections::HashSet::new();
        for c in charset.chars() {
            if !in_charset.insert(c) {
                continue;
            }
            match self.chars.get(&c) {
                Some(&count) => coverage.seen.push((c, count)),
                None => coverage.missing.push(c),
            }
        }
        coverage.outside = self
            .chars
            .iter()
            .filter(|(c, _)| !in_charset.contains(c))
            .map(|(&c, &count)| (c, count))
            .collect();
        coverage
            .outside
            .sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        coverage
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(labels: &[&str]) -> LabelStats {
        let mut stats = LabelStats::default();
        for label in labels {
            stats.add(label);
        }
        stats
    }

    #[test]
    fn counts_lengths_in_characters() {
        let stats = stats(&["ab", "Café", "", "ab"]);
        assert_eq!(stats.labels, 4);
        assert_eq!(
            stats
                .lengths
                .iter()
                .map(|(&l, &n)| (l, n))
                .collect::<Vec<_>>(),
            [(0, 1), (2, 2), (4, 1)]
        );
        assert_eq!(stats.chars.get(&'a'), Some(&3));
        assert_eq!(stats.chars.get(&'é'), Some(&1));
    }

    #[test]
    fn histogram_fills_gaps_and_groups_long_labels() {
        let stats = stats(&[
            "abc",
            "a",
            "abc",
            "x".repeat(30).as_str(),
            "y".repeat(26).as_str(),
        ]);
        let bins = stats.length_histogram(26);
        let rows: Vec<_> = bins.iter().map(|b| (b.min, b.max, b.count)).collect();
        assert_eq!(
            rows[..3],
            [(1, Some(1), 1), (2, Some(2), 0), (3, Some(3), 2)]
        );
        assert_eq!(rows.len(), 26);
        assert_eq!(rows[24], (25, Some(25), 0));
        assert_eq!(rows[25], (26, None, 2));
        assert!(LabelStats::default().length_histogram(26).is_empty());
        // Only long labels: just the open bin.
        let only_long = self::stats(&["z".repeat(40).as_str()]);
        assert_eq!(
            only_long.length_histogram(26),
            [LengthBin {
                min: 26,
                max: None,
                count: 1
            }]
        );
    }

    #[test]
    fn coverage_splits_seen_missing_and_outside() {
        let stats = stats(&["abba", "a c", "ü"]);
        let coverage = stats.coverage("abcd");
        assert_eq!(coverage.seen, [('a', 3), ('b', 2), ('c', 1)]);
        assert_eq!(coverage.missing, ['d']);
        assert_eq!(coverage.outside, [(' ', 1), ('ü', 1)]);
    }

    #[test]
    fn merge_equals_counting_together() {
        let mut left = stats(&["one", "two"]);
        left.merge(&stats(&["three", ""]));
        assert_eq!(left, stats(&["one", "two", "three", ""]));
    }
}
