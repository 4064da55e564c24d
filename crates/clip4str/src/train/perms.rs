//! Permutation language modelling (SPEC §12.2-12.3): which token orders a batch is trained on, and the
//! attention masks that make each decoder query see only the tokens before it in that order.

use candle_core::{Device, Tensor};
use rand::seq::{index, SliceRandom};
use rand::Rng;

use super::TrainError;

/// For 4 characters with mirroring, these indices into the lexicographic list of the 24 permutations
/// pick exactly one permutation of each mirrored pair (the reference's `selector`).
const MIRRORED_POOL_4: [usize; 12] = [0, 3, 4, 6, 9, 10, 12, 16, 17, 18, 19, 21];

/// All permutations of `0..n` in lexicographic order (Python's `itertools.permutations(range(n))`).
fn all_permutations(n: usize) -> Vec<Vec<usize>> {
    if n == 0 {
        return vec![Vec::new()];
    }
    let mut out = Vec::new();
    for first in 0..n {
        for rest in all_permutations(n - 1) {
            let mut p = Vec::with_capacity(n);
            p.push(first);
            p.extend(rest.into_iter().map(|x| if x >= first { x + 1 } else { x }));
            out.push(p);
        }
    }
    out
}

/// `n!`, saturating (only compared against small permutation counts).
fn factorial(n: usize) -> usize {
    (1..=n).fold(1usize, |acc, k| acc.saturating_mul(k))
}

/// The permutations one training batch is decoded in (the reference's `gen_tgt_perms`), as rows of
/// length `max_num_chars + 2` over target positions: BOS (0) first, EOS (`max_num_chars + 1`) last.
///
/// `max_num_chars` is the longest label of the batch. Row 0 is the forward order (with `perm_forward`),
/// row 1 the reverse order with EOS predicted from the null context, and with `perm_mirrored` every
/// sampled order is followed by its mirror. Up to 4 characters the orders are drawn without repetition
/// from the pool of all permutations; beyond that each is a fresh uniform shuffle (repeats possible).
/// The draws come from `rng`, so a seeded generator makes training reproducible.
pub fn gen_tgt_perms<R: Rng + ?Sized>(
    max_num_chars: usize,
    perm_num: usize,
    perm_forward: bool,
    perm_mirrored: bool,
    rng: &mut R,
) -> Vec<Vec<usize>> {
    let n = max_num_chars;
    if n == 1 {
        return vec![vec![0, 1, 2]];
    }
    let max_gen_perms = if perm_mirrored {
        perm_num / 2
    } else {
        perm_num
    };
    let mut perms: Vec<Vec<usize>> = if perm_forward {
        vec![(0..n).collect()]
    } else {
        Vec::new()
    };
    let mut max_perms = factorial(n);
    if perm_mirrored {
        max_perms /= 2;
    }
    let num_gen_perms = max_gen_perms.min(max_perms);
    if n < 5 {
        let all = all_permutations(n);
        let selector: Vec<usize> = if n == 4 && perm_mirrored {
            MIRRORED_POOL_4.to_vec()
        } else {
            (0..max_perms).collect()
        };
        let mut pool: Vec<&Vec<usize>> = selector.iter().filter_map(|&i| all.get(i)).collect();
        if perm_forward && !pool.is_empty() {
            pool.remove(0);
        }
        if !pool.is_empty() {
            let amount = num_gen_perms.saturating_sub(perms.len()).min(pool.len());
            for i in index::sample(rng, pool.len(), amount) {
                perms.push(pool[i].clone());
            }
        }
    } else {
        while perms.len() < num_gen_perms {
            let mut p: Vec<usize> = (0..n).collect();
            p.shuffle(rng);
            perms.push(p);
        }
    }
    if perm_mirrored {
        perms = perms
            .into_iter()
            .flat_map(|p| {
                let flipped: Vec<usize> = p.iter().rev().copied().collect();
                [p, flipped]
            })
            .collect();
    }
    let mut rows: Vec<Vec<usize>> = perms
        .into_iter()
        .map(|p| {
            std::iter::once(0)
                .chain(p.into_iter().map(|x| x + 1))
                .chain(std::iter::once(n + 1))
                .collect()
        })
        .collect();
    if let Some(reverse) = rows.get_mut(1) {
        for (i, slot) in reverse.iter_mut().skip(1).enumerate() {
            *slot = n + 1 - i;
        }
    }
    rows
}

/// Additive attention masks (0 / -inf) for one permutation: `(content_mask, query_mask)`, both
/// `[len-1, len-1]` f32.
///
/// A position may not look at positions that come later in `perm`; the query stream additionally may
/// not look at its own token. Query row `r` predicts target `r` (position `r + 1`); content position 0
/// is BOS.
pub fn generate_attn_masks(
    perm: &[usize],
    device: &Device,
) -> Result<(Tensor, Tensor), TrainError> {
    let sz = perm.len();
    let invalid = |reason: &str| TrainError::InvalidPermutation {
        perm: perm.to_vec(),
        reason: reason.to_string(),
    };
    if sz < 2 {
        return Err(invalid("needs at least BOS and EOS"));
    }
    let mut seen = vec![false; sz];
    for &p in perm {
        match seen.get_mut(p) {
            Some(s) if !*s => *s = true,
            _ => return Err(invalid("not a permutation of 0..len")),
        }
    }
    let mut mask = vec![0f32; sz * sz];
    for (i, &row) in perm.iter().enumerate() {
        for &col in &perm[i + 1..] {
            mask[row * sz + col] = f32::NEG_INFINITY;
        }
    }
    let m = sz - 1;
    let block = |mask: &[f32], row0: usize| -> Vec<f32> {
        (row0..row0 + m)
            .flat_map(|r| mask[r * sz..r * sz + m].iter().copied())
            .collect()
    };
    let content = block(&mask, 0);
    for i in 0..sz {
        mask[i * sz + i] = f32::NEG_INFINITY;
    }
    let query = block(&mask, 1);
    Ok((
        Tensor::from_vec(content, (m, m), device)?,
        Tensor::from_vec(query, (m, m), device)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn lexicographic_permutations() {
        let all = all_permutations(3);
        assert_eq!(
            all,
            vec![
                vec![0, 1, 2],
                vec![0, 2, 1],
                vec![1, 0, 2],
                vec![1, 2, 0],
                vec![2, 0, 1],
                vec![2, 1, 0]
            ]
        );
        assert_eq!(all_permutations(4).len(), 24);
    }

    #[test]
    fn mirrored_pool_picks_one_of_each_pair() {
        let all = all_permutations(4);
        let mut covered = std::collections::HashSet::new();
        for &i in &MIRRORED_POOL_4 {
            let p = &all[i];
            let flipped: Vec<usize> = p.iter().rev().copied().collect();
            assert!(covered.insert(p.clone()) && covered.insert(flipped));
        }
        assert_eq!(covered.len(), 24);
    }

    #[test]
    fn zero_chars_matches_reference_shape() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        assert_eq!(
            gen_tgt_perms(0, 6, true, true, &mut rng),
            vec![vec![0, 1], vec![0, 1]]
        );
    }

    #[test]
    fn rejects_non_permutations() {
        assert!(generate_attn_masks(&[0, 1, 1], &Device::Cpu).is_err());
        assert!(generate_attn_masks(&[0, 3, 1], &Device::Cpu).is_err());
        assert!(generate_attn_masks(&[0], &Device::Cpu).is_err());
    }
}
