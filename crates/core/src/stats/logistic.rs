//! L2-regularised logistic regression, sklearn's objective: minimise C·Σᵢ log(1 + exp(−ŷᵢ(w·xᵢ + b))) + ½‖w‖²
//! (the intercept unpenalised), solved by Newton's method with a backtracking line search. Written here
//! because the probes need only this one model, and its Hessian Xᵀ·diag(p(1−p))·X is one call of the
//! trainer's GEMM; linfa/smartcore would bring ndarray and a generic solver for it.

use crate::kernels::gemm::matmul_nt;

/// A fitted probe: score(x) = w·x + b (log-odds of the positive class).
#[derive(Debug, Clone, PartialEq)]
pub struct Logistic {
    /// Weights, one per input dimension.
    pub weights: Vec<f64>,
    /// Intercept.
    pub bias: f64,
    /// Newton iterations taken.
    pub iterations: usize,
}

impl Logistic {
    /// Log-odds of the positive class for one input row.
    pub fn score(&self, x: &[f32]) -> f64 {
        self.bias
            + x.iter()
                .zip(&self.weights)
                .map(|(&x, w)| x as f64 * w)
                .sum::<f64>()
    }
}

/// Fits on `x` (`n × d`, row-major) and classes `y`; stops when the gradient is below 1e-11 relative to the
/// objective, when a step no longer decreases it beyond rounding, or after 100 iterations.
pub fn fit(x: &[f32], y: &[bool], d: usize, c: f64) -> Logistic {
    let n = y.len();
    assert_eq!(x.len(), n * d);
    let dim = d + 1; // weights, then the intercept
    let mut theta = vec![0f64; dim];
    let objective = |theta: &[f64]| -> f64 {
        let mut loss = 0f64;
        for (row, &yi) in x.chunks(d).zip(y) {
            let z = margin(theta, row);
            loss += log1p_exp(if yi { -z } else { z });
        }
        c * loss + 0.5 * theta[..d].iter().map(|w| w * w).sum::<f64>()
    };
    let mut current = objective(&theta);
    let mut iterations = 0;
    for _ in 0..100 {
        iterations += 1;
        // Gradient (f64) and the Hessian's data term Aᵀ·A with A = √(p(1−p))·[x, 1] (the trainer's GEMM,
        // f32: the Hessian only steers the step, the gradient decides where it ends).
        let mut grad = vec![0f64; dim];
        let mut scaled = vec![0f32; dim * n]; // Aᵀ, `dim × n`
        for (i, (row, &yi)) in x.chunks(d).zip(y).enumerate() {
            let p = sigmoid(margin(&theta, row));
            let r = p - yi as u8 as f64;
            for (g, &v) in grad.iter_mut().zip(row) {
                *g += c * r * v as f64;
            }
            grad[d] += c * r;
            let s = (p * (1.0 - p)).sqrt() as f32;
            for (j, &v) in row.iter().enumerate() {
                scaled[j * n + i] = s * v;
            }
            scaled[d * n + i] = s;
        }
        for j in 0..d {
            grad[j] += theta[j];
        }
        let mut hess32 = vec![0f32; dim * dim];
        matmul_nt(&scaled, &scaled, &mut hess32, dim, dim, n);
        let mut hess: Vec<f64> = hess32.iter().map(|&h| h as f64 * c).collect();
        for j in 0..d {
            hess[j * dim + j] += 1.0;
        }
        // A tiny ridge on the intercept keeps the system positive definite when a class is absent.
        hess[d * dim + d] += 1e-12;
        if grad.iter().fold(0f64, |m, g| m.max(g.abs())) <= 1e-11 * current.abs().max(1.0) {
            break;
        }
        let Some(step) = solve_spd(&mut hess, &grad, dim) else {
            break;
        };
        let decrement: f64 = step.iter().zip(&grad).map(|(s, g)| s * g).sum();
        // Backtracking (Armijo) on the exact objective; no decrease left means the optimum to f64 precision.
        let mut t = 1.0;
        let mut moved = false;
        while t >= 1e-10 {
            let trial: Vec<f64> = theta.iter().zip(&step).map(|(a, s)| a - t * s).collect();
            let value = objective(&trial);
            if value <= current - 1e-4 * t * decrement {
                theta = trial;
                // A decrease at the level of f64 rounding: converged as far as the objective can tell.
                moved = current - value > 1e-15 * current.abs();
                current = value;
                break;
            }
            t *= 0.5;
        }
        if !moved {
            break;
        }
    }
    Logistic {
        bias: theta[d],
        weights: theta[..d].to_vec(),
        iterations,
    }
}

fn margin(theta: &[f64], row: &[f32]) -> f64 {
    let d = row.len();
    theta[d]
        + row
            .iter()
            .zip(theta)
            .map(|(&x, w)| x as f64 * w)
            .sum::<f64>()
}

fn sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

/// log(1 + eᶻ) without overflow.
fn log1p_exp(z: f64) -> f64 {
    if z > 0.0 {
        z + (-z).exp().ln_1p()
    } else {
        z.exp().ln_1p()
    }
}

/// Solves `a·x = b` for a symmetric positive-definite `a` (`n × n`, overwritten by its Cholesky factor);
/// `None` if it is not positive definite.
fn solve_spd(a: &mut [f64], b: &[f64], n: usize) -> Option<Vec<f64>> {
    for j in 0..n {
        let mut diag = a[j * n + j];
        for k in 0..j {
            diag -= a[j * n + k] * a[j * n + k];
        }
        if diag.is_nan() || diag <= 0.0 {
            return None;
        }
        let diag = diag.sqrt();
        a[j * n + j] = diag;
        for i in j + 1..n {
            let mut v = a[i * n + j];
            for k in 0..j {
                v -= a[i * n + k] * a[j * n + k];
            }
            a[i * n + j] = v / diag;
        }
    }
    let mut x = b.to_vec();
    for i in 0..n {
        for k in 0..i {
            x[i] -= a[i * n + k] * x[k];
        }
        x[i] /= a[i * n + i];
    }
    for i in (0..n).rev() {
        for k in i + 1..n {
            x[i] -= a[k * n + i] * x[k];
        }
        x[i] /= a[i * n + i];
    }
    Some(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_dimension_by_hand() {
        // Separable data with C small: the optimum balances ½w² against the loss. Its stationarity
        // condition C·Σ (p − y)·x + w = 0 (and Σ (p − y) = 0 for the intercept) must hold.
        let x = [-2.0f32, -1.0, 1.0, 2.0];
        let y = [false, false, true, true];
        let c = 0.1;
        let m = fit(&x, &y, 1, c);
        let residual = |i: usize| sigmoid(m.score(&x[i..i + 1])) - y[i] as u8 as f64;
        let grad_w: f64 = c * (0..4).map(|i| residual(i) * x[i] as f64).sum::<f64>() + m.weights[0];
        let grad_b: f64 = (0..4).map(residual).sum();
        assert!(
            grad_w.abs() < 1e-9 && grad_b.abs() < 1e-9,
            "{grad_w} {grad_b}"
        );
        assert!(m.weights[0] > 0.0 && m.bias.abs() < 1e-9, "{m:?}");
    }

    #[test]
    fn matches_sklearn() {
        for case in crate::stats::tests::fixtures()["logistic"]
            .as_array()
            .unwrap()
        {
            let d = case["d"].as_u64().unwrap() as usize;
            let x: Vec<f32> = case["x"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect();
            let y: Vec<bool> = case["y"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_bool().unwrap())
                .collect();
            let c = case["c"].as_f64().unwrap();
            let m = fit(&x, &y, d, c);
            let want: Vec<f64> = case["coef"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            for (got, want) in m.weights.iter().zip(&want) {
                assert!(
                    (got - want).abs() < 1e-5 * (1.0 + want.abs()),
                    "C {c}: {:?} vs {want:?}",
                    m.weights
                );
            }
            let bias = case["intercept"].as_f64().unwrap();
            assert!(
                (m.bias - bias).abs() < 1e-5 * (1.0 + bias.abs()),
                "C {c}: {} vs {bias}",
                m.bias
            );
        }
    }
}
