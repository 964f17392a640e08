//! Operating points of a detector: the recall it keeps when its threshold is set on a control set, as
//! Goldowsky-Dill et al. (2025) report deception probes (recall at 1% false positives on neutral chat).

/// Recall of `positive` scores above the threshold that flags at most `fpr` of the `control` scores
/// (the smallest control score with at most ⌊fpr·n⌋ control scores above it; a score equal to it is not
/// flagged). `None` when either set is empty.
pub fn recall_at_fpr(positive: &[f32], control: &[f32], fpr: f64) -> Option<f64> {
    if positive.is_empty() || control.is_empty() {
        return None;
    }
    let mut sorted = control.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let allowed = (fpr * sorted.len() as f64).floor() as usize;
    let threshold = sorted[allowed.min(sorted.len() - 1)];
    let flagged = positive.iter().filter(|&&s| s > threshold).count();
    Some(flagged as f64 / positive.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recall_by_hand() {
        // 200 control scores 0..199: 1% allows 2 above the threshold, so the threshold is 197 (198 and 199
        // are flagged). Positives 196.5, 197 (a tie, not flagged), 197.5, 250: 2 of 4.
        let control: Vec<f32> = (0..200).map(|i| i as f32).collect();
        assert_eq!(
            recall_at_fpr(&[196.5, 197.0, 197.5, 250.0], &control, 0.01),
            Some(0.5)
        );
        // 50 control scores: ⌊0.5⌋ = 0 allowed above, so the threshold is the largest control score.
        let control: Vec<f32> = (0..50).map(|i| i as f32).collect();
        assert_eq!(recall_at_fpr(&[49.0, 49.5], &control, 0.01), Some(0.5));
        assert_eq!(recall_at_fpr(&[], &control, 0.01), None);
        assert_eq!(recall_at_fpr(&[1.0], &[], 0.01), None);
    }
}
