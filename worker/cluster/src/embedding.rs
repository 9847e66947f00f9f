//! Embeddings: a sequence's final hidden states (after the model's last norm) pooled into one
//! vector and L2-normalised, as sentence-embedding models built on Mistral are read.

/// How a sequence's hidden states become one vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Pooling {
    /// The last token's (e5-mistral's: its inputs end with EOS).
    #[default]
    Last,
    /// The mean over every token.
    Mean,
}

/// `rows` (`[n, dim]`, row-major) pooled and L2-normalised; sums in f64.
pub fn pool(rows: &[f32], dim: usize, pooling: Pooling) -> Vec<f32> {
    let n = rows.len() / dim.max(1);
    let pooled: Vec<f64> = match pooling {
        Pooling::Last => rows[(n - 1) * dim..].iter().map(|&v| f64::from(v)).collect(),
        Pooling::Mean => (0..dim).map(|j| rows.iter().skip(j).step_by(dim).map(|&v| f64::from(v)).sum::<f64>() / n as f64).collect(),
    };
    let norm = pooled.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-12);
    pooled.iter().map(|v| (v / norm) as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooling_takes_the_last_row_or_the_mean_and_normalises() {
        let rows = [3.0, 0.0, 0.0, 4.0, 1.0, 2.0];
        assert_eq!(pool(&rows, 2, Pooling::Last), vec![1.0 / 5f32.sqrt(), 2.0 / 5f32.sqrt()]);
        // Mean (4/3, 2): length sqrt(16/9 + 4) = sqrt(52)/3.
        let mean = pool(&rows, 2, Pooling::Mean);
        assert!((mean[0] - 4.0 / 52f32.sqrt()).abs() < 1e-6 && (mean[1] - 6.0 / 52f32.sqrt()).abs() < 1e-6);
    }
}
