import pytest

from problems import PROBLEMS, dense_hessian


@pytest.fixture(scope="session")
def dense_cache():
    cache = {}

    def get(name):
        if name not in cache:
            problem = PROBLEMS[name]()
            cache[name] = (problem, dense_hessian(problem))
        return cache[name]

    return get
