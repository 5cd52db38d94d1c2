"""The writing wing: raw turn log, observation extraction, memory evolution, retrieval."""
