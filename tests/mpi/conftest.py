"""The cases here run on every rank of ``mpiexec -n N python -m pytest tests/mpi``
(tests/test_mpi.py launches them); a plain pytest run, outside mpiexec, skips the folder."""
import os

# MPICH's hydra sets PMI_SIZE, Open MPI OMPI_COMM_WORLD_SIZE, PMIx launchers PMIX_RANK
_LAUNCHED = any(os.environ.get(v) for v in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK"))
collect_ignore_glob = [] if _LAUNCHED else ["test_*.py"]
