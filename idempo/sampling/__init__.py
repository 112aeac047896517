"""Samplers: generation j-1 writes the data generation j trains on (and the answers we evaluate)."""

from idempo.chat import Prompt
from idempo.config import SamplingParams
from idempo.registry import SAMPLERS
from idempo.sampling.base import Completion, Sampler
