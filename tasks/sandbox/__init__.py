"""The confined side of build, test and lint jobs: the work directory and what confines it
(`workspace`, `confinement`), running commands in it (`runner`), killing what they leave
(`processes`), fetching sources (`sources`), the job's log (`joblog`), and reading what a job left
without following its links (`files`)."""
