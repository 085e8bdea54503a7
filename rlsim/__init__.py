"""rlsim: train and evaluate recommendation policies against simulated users."""

__version__ = "0.1.0"
