import numpy as np
import pytest


def synthetic_requests(n: int, rate: float, seed: int, mean_len: int = 400, high_fraction: float = 0.0):
    """Heavy-tailed lengths and Poisson arrivals, independent of the workload module (which has its own tests)."""
    from llumnix.core.request import Request

    rng = np.random.default_rng(seed)
    t = np.cumsum(rng.exponential(1.0 / rate, n))
    lens = np.clip((rng.pareto(1.3, (n, 2)) + 0.05) * mean_len * 0.3, 1, 4000).astype(int)
    high = rng.random(n) < high_fraction
    return [Request(i, float(t[i]), int(lens[i, 0]), int(lens[i, 1]), priority=int(high[i])) for i in range(n)]


@pytest.fixture(scope="session")
def a10():
    from llumnix.profiles import Profile

    return Profile.load("a10-llama-7b")


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray for one test module (2 CPUs, no dashboard), shut down after it."""
    import ray

    from llumnix.runtime.frontend import init_ray

    init_ray(None, num_cpus=2, log_to_driver=False)
    yield ray
    ray.shutdown()
