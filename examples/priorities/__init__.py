"""Seed 002's priorities app: ETA tasks, priority lists, and where restored tasks land."""
