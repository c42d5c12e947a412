"""Step updates of the ensemble sampler: flow-matching Euler and flow-matching UniPC (Wan2.2's default).

Both are written for `wmfast.inference.ensemble._StepRunner`: the sampler builds every per-step number on the
host once, before the loop, as device tables; a step reads one row of them (`row`), so the step loop never
syncs with the host and one captured CUDA graph serves every step. An update is called as
`update(x, v, row, context) -> next x` with the clean context latents re-imposed on the result, `reset(x)`
before the first step of each micro-batch chunk, and `state()` / `load_state(s)` so that the CUDA-graph
verification can replay a step from the state the eager step started from.

Euler: `x <- x + dt v`, `row` = dt (a 0-d tensor); stateless; the fused op `ops.ensemble_euler_step`.

UniPC (diffusers' `UniPCMultistepScheduler` as Wan2.2 configures it: flow_prediction, use_flow_sigmas,
flow_shift 5, solver_order 2, bh2, predict_x0, lower_order_final). With the x0-prediction `m_i = x_i - s_i v_i`
every step is one linear combination of the current sample, the model outputs and a short history:

    corrector  xc_i    = cs x_i + cl xc_{i-1} + c0 m_i + c1 m_{i-1} + c2 m_{i-2}
    predictor  x_{i+1} = px xc_i + p0 m_i + p1 m_{i-1},        then the context is re-imposed on x_{i+1}

`unipc_coefficients` computes the nine numbers of each step (columns `UNIPC_COLUMNS`) in float64 from the
sigma schedule, following diffusers' `multistep_uni_c_bh_update` / `multistep_uni_p_bh_update` term by term.
Steps without a corrector (the first) or with a lower order (the first, the last, and the corrector after
an order-1 predictor) carry zeros in the columns of the missing terms, so the same code, and the same
captured graph, runs every step. The history (m_{i-1}, m_{i-2}, xc_{i-1}) lives in three preallocated
buffers updated in place, zeroed at the start of every chunk (a zero coefficient times uninitialised memory
could be NaN).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from wmfast import ops
from wmfast.kernels.ensemble_sampler import ensemble_euler_step_ref

SOLVERS = ("euler", "unipc")
UNIPC_COLUMNS = ("sigma", "cs", "cl", "c0", "c1", "c2", "px", "p0", "p1")
NUM_TRAIN_TIMESTEPS = 1000


def check_solver(name: str, field: str = "solver") -> str:
    if name not in SOLVERS:
        raise ValueError(f"{field} must be one of {', '.join(SOLVERS)}, got {name!r}")
    return name


# ------------------------------------------------------------------------------------------------ Euler


class EulerUpdate:
    """x + dt v with the context re-imposed: the fused op, or its torch reference (fused=False, or float64
    latents, which the ops refuse)."""

    def __init__(self, fused: bool = True):
        self.fn = ops.ensemble_euler_step if fused else ensemble_euler_step_ref

    def reset(self, x: torch.Tensor) -> None:
        pass

    def state(self) -> tuple:
        return ()

    def load_state(self, state: tuple) -> None:
        pass

    def __call__(self, x, v, dt, context):
        fn = ensemble_euler_step_ref if x.dtype == torch.float64 else self.fn
        return fn(x, v, dt, context)


# ------------------------------------------------------------------------------------------------ UniPC


def unipc_sigmas(steps: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """diffusers' flow sigmas (`set_timesteps` with use_flow_sigmas, final_sigmas_type="zero"), the schedule
    Wan2.2's pipeline samples with: s = linspace(1, 1/1000, steps + 1)[:-1], shifted (s' = shift s /
    (1 + (shift - 1) s)), the first lowered by 1e-6 (keeps log(1 - s) finite), then 0 appended.

    Returns (sigmas [steps + 1] float64 holding diffusers' float32 values, integer timesteps [steps]: the
    model's timestep, int(1000 s') truncated as diffusers' int64 cast does)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    s = np.linspace(1, 1 / NUM_TRAIN_TIMESTEPS, steps + 1)[:-1]
    s = shift * s / (1 + (shift - 1) * s)
    if abs(s[0] - 1) < 1e-6:
        s[0] -= 1e-6
    timesteps = np.trunc(s * NUM_TRAIN_TIMESTEPS)
    sigmas = np.concatenate([s, [0.0]]).astype(np.float32).astype(np.float64)
    return sigmas, timesteps


def _lam(sigma: float) -> float:
    """log-SNR of the flow schedule: alpha = 1 - sigma, lambda = log(alpha) - log(sigma)."""
    return math.log(1 - sigma) - math.log(sigma)


def unipc_orders(steps: int) -> list[int]:
    """The predictor's order at each step: solver_order 2, warming up (order 1 at step 0) and lower_order_final
    (order 1 at the last step): min(2, steps - i, i + 1)."""
    return [min(2, steps - i, i + 1) for i in range(steps)]


def unipc_coefficients(sigmas: np.ndarray) -> np.ndarray:
    """[steps, 9] float64: each step's coefficients (columns UNIPC_COLUMNS) from sigmas [steps + 1] (last 0).

    bh2 with x0-prediction: hh = -(lambda_t - lambda_s0), B(h) = h_phi_1 = expm1(hh). Order-2 terms use
    r1 = (lambda_{s1} - lambda_{s0}) / h and D1 = (m_{s1} - m_{s0}) / r1; the predictor's order-2 weight is 0.5,
    the corrector's weights solve [[1, 1], [r1, 1]] rho = b (order 1: rho = 0.5)."""
    steps = len(sigmas) - 1
    orders = unipc_orders(steps)
    out = np.zeros((steps, len(UNIPC_COLUMNS)), dtype=np.float64)
    col = {name: j for j, name in enumerate(UNIPC_COLUMNS)}
    for i in range(steps):
        row = out[i]
        row[col["sigma"]] = sigmas[i]
        # corrector: refines x_i with m_i, from xc_{i-1} and the history, at the previous step's order
        if i == 0:
            row[col["cs"]] = 1.0
        else:
            s_t, s_0 = sigmas[i], sigmas[i - 1]
            h = _lam(s_t) - _lam(s_0)
            hh, alpha_t = -h, 1 - s_t
            h_phi_1 = b_h = math.expm1(hh)
            if orders[i - 1] == 1:
                rho_d, rho_t = 0.0, 0.5
            else:
                r1 = (_lam(sigmas[i - 2]) - _lam(s_0)) / h
                h_phi_k = h_phi_1 / hh - 1
                b = [h_phi_k / b_h, (h_phi_k / hh - 0.5) * 2 / b_h]
                rho = np.linalg.solve(np.array([[1.0, 1.0], [r1, 1.0]]), np.array(b))
                rho_d, rho_t = rho[0] / r1, rho[1]
            # xc = s_t/s_0 xc_{i-1} - a_t h_phi_1 m_{i-1} - a_t B_h (rho_d (m_{i-2} - m_{i-1}) + rho_t (m_i - m_{i-1}))
            row[col["cl"]] = s_t / s_0
            row[col["c0"]] = -alpha_t * b_h * rho_t
            row[col["c1"]] = -alpha_t * h_phi_1 + alpha_t * b_h * (rho_d + rho_t)
            row[col["c2"]] = -alpha_t * b_h * rho_d
        # predictor: x_{i+1} from xc_i, m_i and (order 2) m_{i-1}
        s_t, s_0 = sigmas[i + 1], sigmas[i]
        if s_t == 0:  # lambda_t = inf: h_phi_1 = B_h = -1, so x_{i+1} = m_i (the last step, always order 1)
            row[col["p0"]] = 1.0
            continue
        h = _lam(s_t) - _lam(s_0)
        alpha_t = 1 - s_t
        h_phi_1 = b_h = math.expm1(-h)
        row[col["px"]] = s_t / s_0
        row[col["p0"]] = -alpha_t * h_phi_1
        if orders[i] == 2:
            w = 0.5 / ((_lam(sigmas[i - 1]) - _lam(s_0)) / h)  # rho_p / r1
            row[col["p0"]] += alpha_t * b_h * w
            row[col["p1"]] = -alpha_t * b_h * w
    return out


def unipc_tables(steps: int, shift: float, num_frames: int, num_context: int, device,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Device tables of the UniPC loop: (timesteps [steps, F'] float32, 0 on the context frames and diffusers'
    integer timestep elsewhere; coefficients [steps, 9] in `dtype`, the update's arithmetic dtype)."""
    sigmas, timesteps = unipc_sigmas(steps, shift)
    t = torch.from_numpy(timesteps).float()[:, None].repeat(1, num_frames)
    t[:, :num_context] = 0.0
    coefs = torch.from_numpy(unipc_coefficients(sigmas)).to(dtype)
    return t.to(device), coefs.to(device)


class UniPCUpdate:
    """The UniPC step of a micro-batch: arithmetic in fp32 (fp64 for fp64 latents), history kept in
    preallocated buffers of that dtype, the result cast to the latents' dtype.

    Plain torch elementwise ops, about 15 passes over the ensemble's latents: at 512x512 that is ~1.4 MB per
    member in fp32, microseconds of memory traffic against the ~1.8e13 FLOP per member of the DiT forward
    that precedes it (tens of milliseconds), so a fused kernel would not be measurable."""

    def __init__(self):
        self.m1 = self.m2 = self.last = None  # m_{i-1}, m_{i-2}, xc_{i-1}

    @staticmethod
    def compute_dtype(dtype: torch.dtype) -> torch.dtype:
        return torch.float64 if dtype == torch.float64 else torch.float32

    def reset(self, x: torch.Tensor) -> None:
        """Zero the history (allocated on first use, at x's shape: a runner serves one micro-batch size)."""
        if self.m1 is None or self.m1.shape != x.shape or self.m1.device != x.device:
            dtype = self.compute_dtype(x.dtype)
            self.m1, self.m2, self.last = (torch.zeros(x.shape, device=x.device, dtype=dtype) for _ in range(3))
        else:
            for buf in (self.m1, self.m2, self.last):
                buf.zero_()

    def state(self) -> tuple:
        return tuple(buf.clone() for buf in (self.m1, self.m2, self.last))

    def load_state(self, state: tuple) -> None:
        for buf, saved in zip((self.m1, self.m2, self.last), state):
            buf.copy_(saved)

    def __call__(self, x, v, row, context):
        """x, v: [n, C, F', H', W']; row: [9] (UNIPC_COLUMNS); context: [1, C, Fc, H', W']."""
        sigma, cs, cl, c0, c1, c2, px, p0, p1 = row.unbind(0)
        dtype = self.m1.dtype
        xf = x.to(dtype)
        m = xf - sigma * v.to(dtype)                                                    # x0-prediction m_i
        xc = cs * xf + cl * self.last + c0 * m + c1 * self.m1 + c2 * self.m2             # corrector
        y = px * xc + p0 * m + p1 * self.m1                                              # predictor
        self.m2.copy_(self.m1)
        self.m1.copy_(m)
        self.last.copy_(xc)
        y[:, :, : context.shape[2]] = context
        return y.to(x.dtype)
